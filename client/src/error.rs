//! The client's error type.

use switchboard_protocol::{ErrorCode, FrameError};

/// A boxed error from an application callback (e.g. a token provider).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a request or connection attempt failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered with an `Error` frame.
    #[error("server error {code}: {message}")]
    Server {
        /// The broker's error code (unknown codes map to `Unspecified`).
        code: ErrorCode,
        /// The broker's human-readable explanation.
        message: String,
        /// For `RATE_LIMITED` and `UNAVAILABLE`: wait at least this long before retrying.
        retry_after_ms: u64,
        /// The broker's machine-readable refinement of `code` (e.g. `expired`,
        /// `bad_signature` for a rejected token); empty when it gave none.
        reason: String,
    },
    /// The connection dropped while the request was in flight, or the client was disconnected
    /// when a non-send request was issued. The request may or may not have taken effect.
    #[error("connection lost")]
    ConnectionLost,
    /// The client was closed (by [`Client::close`](crate::Client::close), a permanent
    /// authentication failure, or because reconnecting is disabled).
    #[error("client closed")]
    Closed,
    /// Connecting or talking to the broker failed at the transport level.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame could not be encoded or decoded (e.g. it exceeds the frame limit).
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    /// The broker broke the protocol (unexpected reply, missing field, wrong order).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Connecting or the handshake did not finish in time.
    #[error("timed out")]
    Timeout,
    /// The token provider failed to produce a token.
    #[error("token provider failed: {0}")]
    TokenProvider(#[source] BoxError),
}

impl Error {
    /// Builds a [`Error::Server`] from a wire `Error`.
    pub(crate) fn from_wire(e: switchboard_protocol::Error) -> Self {
        Error::Server {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
            reason: e.reason,
        }
    }

    /// The broker's machine-readable reason (`Error.reason`), when this is a
    /// [`Error::Server`] that carries one.
    #[must_use]
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Server { reason, .. } if !reason.is_empty() => Some(reason),
            _ => None,
        }
    }

    /// The broker's error code, when this is a [`Error::Server`].
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
