//! Where a job's connectors connect: the broker this process runs (in-process sessions), or
//! a broker over TCP. Cloned into every worker; each source and sink opens its own
//! transport from it.

use crate::error::ConnectError;
use crate::transport::amqp::{AmqpOptions, AmqpSink, AmqpSource};
use crate::transport::embedded::{EmbeddedSink, EmbeddedSource};
use crate::transport::{ConsumeSpec, Credentials, PublishSpec, SinkTransport, SourceTransport};
use rill_broker::Broker;
use std::sync::Arc;

/// A broker to read from and write to.
#[derive(Clone)]
pub enum Endpoint {
    /// The broker of this process, through in-process sessions.
    Embedded {
        broker: Broker,
        credentials: Credentials,
    },
    /// Any AMQP 0-9-1 broker: `amqp://user:pass@host:port/vhost`.
    Amqp { uri: String, options: AmqpOptions },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Embedded { credentials, .. } => f
                .debug_struct("Embedded")
                .field("user", &credentials.user)
                .field("vhost", &credentials.vhost)
                .finish(),
            // The URI may carry a password.
            Endpoint::Amqp { .. } => f.write_str("Amqp"),
        }
    }
}

impl Endpoint {
    /// The broker of this process, logging in as `credentials`.
    pub fn embedded(broker: Broker, credentials: Credentials) -> Endpoint {
        Endpoint::Embedded {
            broker,
            credentials,
        }
    }

    /// A broker over TCP, with default timeouts and backoff.
    pub fn amqp(uri: &str) -> Endpoint {
        Endpoint::Amqp {
            uri: uri.to_owned(),
            options: AmqpOptions::default(),
        }
    }

    /// Whether it is the in-process broker.
    pub fn is_embedded(&self) -> bool {
        matches!(self, Endpoint::Embedded { .. })
    }

    /// Starts consuming as `spec` says; `wake` is called when deliveries arrive.
    pub fn source(
        &self,
        spec: &ConsumeSpec,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Box<dyn SourceTransport>, ConnectError> {
        Ok(match self {
            Endpoint::Embedded {
                broker,
                credentials,
            } => Box::new(EmbeddedSource::start(broker, credentials, spec, wake)?),
            Endpoint::Amqp { uri, options } => {
                Box::new(AmqpSource::start_with(uri, spec, wake, options)?)
            }
        })
    }

    /// Starts a confirming publisher as `spec` says; `wake` is called when confirms arrive.
    pub fn sink(
        &self,
        spec: &PublishSpec,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<Box<dyn SinkTransport>, ConnectError> {
        Ok(match self {
            Endpoint::Embedded {
                broker,
                credentials,
            } => Box::new(EmbeddedSink::start(broker, credentials, spec, wake)?),
            Endpoint::Amqp { uri, options } => {
                Box::new(AmqpSink::start_with(uri, spec, wake, options)?)
            }
        })
    }
}
