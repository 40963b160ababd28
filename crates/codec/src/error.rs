//! Reply codes and the one error type of the codec layer.
//!
//! Every failure the codec reports is an AMQP error: it carries the reply code the
//! server must send, and whether that code closes the channel (soft) or the whole
//! connection (hard). Only the server turns it into `channel.close` /
//! `connection.close`; [`AmqpError::to_close`] builds that method for it.

use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::ShortString;

/// AMQP 0-9-1 reply codes (the spec's constants), as RabbitMQ uses them.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    /// 200: success (used in close-ok style replies and `connection.close` on shutdown).
    ReplySuccess = 200,
    /// 311: the client tried to transfer content larger than the server could accept.
    ContentTooLarge = 311,
    /// 312: a mandatory message could not be routed (basic.return).
    NoRoute = 312,
    /// 313: an immediate message had no consumer (basic.return).
    NoConsumers = 313,
    /// 320: an operator closed the connection.
    ConnectionForced = 320,
    /// 402: invalid virtual host path.
    InvalidPath = 402,
    /// 403: access refused (permissions, `amq.` names, exclusive consumers).
    AccessRefused = 403,
    /// 404: no such exchange / queue.
    NotFound = 404,
    /// 405: exclusive queue owned by another connection.
    ResourceLocked = 405,
    /// 406: a precondition failed (redeclare mismatch, unknown delivery tag, ...).
    PreconditionFailed = 406,
    /// 501: malformed frame.
    FrameError = 501,
    /// 502: a frame had bad field values.
    SyntaxError = 502,
    /// 503: an invalid sequence of frames or methods.
    CommandInvalid = 503,
    /// 504: a channel that is not open.
    ChannelError = 504,
    /// 505: a frame the server did not expect.
    UnexpectedFrame = 505,
    /// 506: the server ran out of a resource.
    ResourceError = 506,
    /// 530: the client tried something the server forbids (e.g. unknown vhost).
    NotAllowed = 530,
    /// 540: functionality not implemented.
    NotImplemented = 540,
    /// 541: internal server error.
    InternalError = 541,
}

impl ReplyCode {
    /// All reply codes, in numeric order.
    pub const ALL: [ReplyCode; 19] = [
        ReplyCode::ReplySuccess,
        ReplyCode::ContentTooLarge,
        ReplyCode::NoRoute,
        ReplyCode::NoConsumers,
        ReplyCode::ConnectionForced,
        ReplyCode::InvalidPath,
        ReplyCode::AccessRefused,
        ReplyCode::NotFound,
        ReplyCode::ResourceLocked,
        ReplyCode::PreconditionFailed,
        ReplyCode::FrameError,
        ReplyCode::SyntaxError,
        ReplyCode::CommandInvalid,
        ReplyCode::ChannelError,
        ReplyCode::UnexpectedFrame,
        ReplyCode::ResourceError,
        ReplyCode::NotAllowed,
        ReplyCode::NotImplemented,
        ReplyCode::InternalError,
    ];

    /// Whether this code closes the connection (a "hard" error) rather than the channel.
    ///
    /// ```
    /// use rill_codec::ReplyCode;
    /// assert!(ReplyCode::FrameError.is_hard());
    /// assert!(!ReplyCode::NotFound.is_hard());
    /// ```
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            ReplyCode::ConnectionForced
                | ReplyCode::InvalidPath
                | ReplyCode::FrameError
                | ReplyCode::SyntaxError
                | ReplyCode::CommandInvalid
                | ReplyCode::ChannelError
                | ReplyCode::UnexpectedFrame
                | ReplyCode::ResourceError
                | ReplyCode::NotAllowed
                | ReplyCode::NotImplemented
                | ReplyCode::InternalError
        )
    }

    /// The numeric code sent on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The code for a number, if it is one of the spec's reply codes.
    pub fn from_code(code: u16) -> Option<ReplyCode> {
        ReplyCode::ALL.iter().copied().find(|c| c.code() == code)
    }

    /// The name RabbitMQ puts in front of reply texts, e.g. `NOT_FOUND`.
    pub fn name(self) -> &'static str {
        match self {
            ReplyCode::ReplySuccess => "REPLY_SUCCESS",
            ReplyCode::ContentTooLarge => "CONTENT_TOO_LARGE",
            ReplyCode::NoRoute => "NO_ROUTE",
            ReplyCode::NoConsumers => "NO_CONSUMERS",
            ReplyCode::ConnectionForced => "CONNECTION_FORCED",
            ReplyCode::InvalidPath => "INVALID_PATH",
            ReplyCode::AccessRefused => "ACCESS_REFUSED",
            ReplyCode::NotFound => "NOT_FOUND",
            ReplyCode::ResourceLocked => "RESOURCE_LOCKED",
            ReplyCode::PreconditionFailed => "PRECONDITION_FAILED",
            ReplyCode::FrameError => "FRAME_ERROR",
            ReplyCode::SyntaxError => "SYNTAX_ERROR",
            ReplyCode::CommandInvalid => "COMMAND_INVALID",
            ReplyCode::ChannelError => "CHANNEL_ERROR",
            ReplyCode::UnexpectedFrame => "UNEXPECTED_FRAME",
            ReplyCode::ResourceError => "RESOURCE_ERROR",
            ReplyCode::NotAllowed => "NOT_ALLOWED",
            ReplyCode::NotImplemented => "NOT_IMPLEMENTED",
            ReplyCode::InternalError => "INTERNAL_ERROR",
        }
    }
}

/// An AMQP error as sent in `channel.close` / `connection.close`: the reply code, the
/// reply text and the class/method that caused it (0, 0 if none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct AmqpError {
    /// The reply code.
    pub code: ReplyCode,
    /// The reply text, RabbitMQ style: `"NOT_FOUND - no exchange 'x' in vhost '/'"`.
    pub text: String,
    /// Class id of the method that caused the error, or 0.
    pub class_id: u16,
    /// Method id of the method that caused the error, or 0.
    pub method_id: u16,
}

impl AmqpError {
    /// An error whose text is the code's name, `" - "`, and `detail` (RabbitMQ's format).
    ///
    /// ```
    /// use rill_codec::{AmqpError, ReplyCode};
    /// let e = AmqpError::new(ReplyCode::NotFound, "no exchange 'x' in vhost '/'")
    ///     .with_method(60, 40);
    /// assert_eq!(e.text, "NOT_FOUND - no exchange 'x' in vhost '/'");
    /// assert_eq!((e.class_id, e.method_id), (60, 40));
    /// assert!(!e.is_hard());
    /// ```
    pub fn new(code: ReplyCode, detail: impl std::fmt::Display) -> Self {
        AmqpError {
            code,
            text: format!("{} - {}", code.name(), detail),
            class_id: 0,
            method_id: 0,
        }
    }

    /// The same error, attributed to the given class and method.
    #[must_use]
    pub fn with_method(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }

    /// Whether the error closes the connection rather than only the channel.
    pub fn is_hard(&self) -> bool {
        self.code.is_hard()
    }

    /// The reply text as a short string, cut to 255 bytes at a character boundary
    /// (texts built from client-supplied names can be longer; `ShortString::from` would panic).
    pub fn reply_text(&self) -> ShortString {
        crate::wire::short_string_truncated(&self.text)
    }

    /// The close method to send for this error: `connection.close` if it is hard,
    /// `channel.close` otherwise.
    pub fn to_close(&self) -> AMQPClass {
        if self.is_hard() {
            self.to_connection_close()
        } else {
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: self.code.code(),
                reply_text: self.reply_text(),
                class_id: self.class_id,
                method_id: self.method_id,
            }))
        }
    }

    /// `connection.close` for this error whatever its code (a soft code raised where only the
    /// connection can answer, e.g. before any channel is open).
    pub fn to_connection_close(&self) -> AMQPClass {
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: self.code.code(),
            reply_text: self.reply_text(),
            class_id: self.class_id,
            method_id: self.method_id,
        }))
    }

    /// Arguments that cannot be decoded. RabbitMQ reports these as 501 FRAME_ERROR
    /// ("cannot decode ..."), so we do too.
    pub(crate) fn undecodable(detail: impl std::fmt::Display) -> Self {
        AmqpError::new(
            ReplyCode::FrameError,
            format_args!("cannot decode: {detail}"),
        )
    }

    pub(crate) fn frame(detail: impl std::fmt::Display) -> Self {
        AmqpError::new(ReplyCode::FrameError, detail)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;

    #[test]
    fn codes_and_hardness_match_amq_protocol() {
        use amq_protocol::protocol::{AMQPHardError, AMQPSoftError};
        for c in ReplyCode::ALL {
            assert_eq!(ReplyCode::from_code(c.code()), Some(c));
            if c == ReplyCode::ReplySuccess {
                continue;
            }
            let hard = AMQPHardError::from_id(c.code()).is_some();
            let soft = AMQPSoftError::from_id(c.code()).is_some();
            assert!(hard != soft, "{c:?}");
            assert_eq!(c.is_hard(), hard, "{c:?}");
        }
        assert_eq!(ReplyCode::from_code(999), None);
    }

    #[test]
    fn close_methods() {
        let soft =
            AmqpError::new(ReplyCode::NotFound, "no queue 'q' in vhost '/'").with_method(50, 10);
        match soft.to_close() {
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                assert_eq!(c.reply_code, 404);
                assert_eq!(
                    c.reply_text.as_str(),
                    "NOT_FOUND - no queue 'q' in vhost '/'"
                );
                assert_eq!((c.class_id, c.method_id), (50, 10));
            }
            other => panic!("{other:?}"),
        }
        let hard = AmqpError::new(ReplyCode::FrameError, "x".repeat(1000));
        match hard.to_close() {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                assert_eq!(c.reply_code, 501);
                assert_eq!(c.reply_text.as_str().len(), 255);
            }
            other => panic!("{other:?}"),
        }
    }
}
