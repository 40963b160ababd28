//! The connectors' error type: what went wrong, whether trying again can help, and the AMQP
//! reply code when a broker said no.

use rill_codec::{AmqpError, ReplyCode};

/// Why a source or sink stopped (or could not start).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The broker refused an operation with a reply code: a missing queue (404 NOT_FOUND),
    /// bad credentials or a refused permission (403 ACCESS_REFUSED), an unknown vhost
    /// (530 NOT_ALLOWED), inequivalent declarations (406 PRECONDITION_FAILED)...
    #[error("{what}: the broker replied {code} {name}: {text}")]
    Refused {
        what: String,
        code: u16,
        name: &'static str,
        text: String,
    },
    /// The broker could not be reached or the connection broke; reconnecting may help.
    #[error("{what}: {detail}")]
    Connection { what: String, detail: String },
    /// A message the job cannot read (not UTF-8, not the expected JSON), under the `fail`
    /// policy.
    #[error("bad input in queue '{queue}' (delivery {delivery_tag}): {detail}")]
    BadInput {
        queue: String,
        delivery_tag: u64,
        detail: String,
    },
    /// A connector was set up wrongly.
    #[error("{0}")]
    Config(String),
}

impl ConnectError {
    /// An error the broker answered with, from the core's [`AmqpError`].
    pub fn refused(what: impl Into<String>, e: &AmqpError) -> ConnectError {
        ConnectError::Refused {
            what: what.into(),
            code: e.code.code(),
            name: e.code.name(),
            text: e.text.clone(),
        }
    }

    /// An error the broker answered with, from a reply code and text (a client library's
    /// channel or connection close).
    pub fn refused_code(
        what: impl Into<String>,
        code: u16,
        text: impl Into<String>,
    ) -> ConnectError {
        ConnectError::Refused {
            what: what.into(),
            code,
            name: ReplyCode::from_code(code).map_or("UNKNOWN", ReplyCode::name),
            text: text.into(),
        }
    }

    /// The AMQP reply code, if the broker refused something.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            ConnectError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying (reconnecting) may succeed: lost connections and brokers that are
    /// restarting, not refusals that would be repeated.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Connection { .. } => true,
            // 320 CONNECTION_FORCED: the broker is shutting down or restarting.
            ConnectError::Refused { code, .. } => *code == 320 || *code == 541,
            ConnectError::BadInput { .. } | ConnectError::Config(_) => false,
        }
    }
}

impl From<ConnectError> for rill_stream::StreamError {
    fn from(e: ConnectError) -> Self {
        rill_stream::StreamError::External(std::sync::Arc::new(e))
    }
}
