//! One connection attempt: open the transport, send Hello, wait for Welcome.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchboard_protocol::{
    self as pb, ClientCodec, ClientFrame, DisconnectReason, ErrorCode, PROTOCOL_VERSION,
    SyncPosition, Welcome, client_frame, server_frame,
};
use tokio::time::timeout;
use tokio_util::codec::Framed;

use crate::builder::{BoxTransport, Config, TokenSource};
use crate::error::Error;

/// The framed transport of an established connection.
pub(crate) type Conn = Framed<BoxTransport, ClientCodec>;

/// An authenticated connection.
pub(crate) struct Session {
    pub(crate) framed: Conn,
    pub(crate) welcome: Welcome,
}

/// Why an attempt failed, and whether trying again can help.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Retrying cannot succeed (token rejected with no provider, unsupported protocol version,
    /// a different user than before).
    Permanent(Error),
    /// Retry after a backoff of at least `retry_after`.
    Transient { error: Error, retry_after: Duration },
}

impl ConnectError {
    fn transient(error: Error) -> Self {
        ConnectError::Transient { error, retry_after: Duration::ZERO }
    }
}

/// Connects, authenticates and returns the session. `expected_user` (on reconnect) must match
/// the Welcome's user id.
pub(crate) async fn establish(
    cfg: Arc<Config>,
    resume: SyncPosition,
    hello_id: u64,
    expected_user: Option<String>,
) -> Result<Session, ConnectError> {
    let static_token = matches!(cfg.token, TokenSource::Static(_));
    let attempt = async {
        let token = cfg.token.token().await.map_err(ConnectError::transient)?;
        let stream = (cfg.connector)().await.map_err(|e| ConnectError::transient(e.into()))?;
        let mut framed = Framed::new(stream, ClientCodec::new(cfg.max_frame_bytes));
        let hello = pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            token,
            resume: Some(resume),
            client: cfg.client_name.clone(),
        };
        framed
            .send(ClientFrame::request(hello_id, client_frame::Kind::Hello(hello)))
            .await
            .map_err(|e| ConnectError::transient(e.into()))?;
        let welcome = await_welcome(&mut framed, hello_id, static_token).await?;
        Ok(Session { framed, welcome })
    };
    let session = timeout(cfg.connect_timeout, attempt)
        .await
        .map_err(|_| ConnectError::transient(Error::Timeout))??;
    if let Some(expected) = expected_user
        && session.welcome.user_id != expected
    {
        return Err(ConnectError::Permanent(Error::Protocol(format!(
            "reconnected as user {:?}, expected {expected:?}",
            session.welcome.user_id
        ))));
    }
    Ok(session)
}

async fn await_welcome(
    framed: &mut Conn,
    hello_id: u64,
    static_token: bool,
) -> Result<Welcome, ConnectError> {
    let frame = match framed.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(ConnectError::transient(e.into())),
        None => {
            let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "closed during handshake");
            return Err(ConnectError::transient(eof.into()));
        }
    };
    match frame.kind {
        Some(server_frame::Kind::Welcome(w)) if frame.request_id == hello_id => Ok(w),
        Some(server_frame::Kind::Error(e)) => {
            let retry_after = Duration::from_millis(e.retry_after_ms);
            let error = Error::from_wire(e);
            let permanent = match error.code() {
                Some(ErrorCode::Unauthenticated | ErrorCode::TokenExpired) => static_token,
                Some(ErrorCode::ProtocolVersion) => true,
                _ => false,
            };
            Err(if permanent {
                ConnectError::Permanent(error)
            } else {
                ConnectError::Transient { error, retry_after }
            })
        }
        Some(server_frame::Kind::Disconnect(d)) => {
            let reason = DisconnectReason::try_from(d.reason).unwrap_or_default();
            let auth = reason == DisconnectReason::AuthFailed;
            let error = Error::Server {
                code: if auth { ErrorCode::Unauthenticated } else { ErrorCode::Unavailable },
                message: format!("disconnected during handshake ({reason:?}): {}", d.message),
                retry_after_ms: d.retry_after_ms,
                reason: String::new(),
            };
            let retry_after = Duration::from_millis(d.retry_after_ms);
            Err(if auth && static_token {
                ConnectError::Permanent(error)
            } else {
                ConnectError::Transient { error, retry_after }
            })
        }
        other => {
            let what = format!("expected Welcome to request {hello_id}, got {other:?}");
            Err(ConnectError::transient(Error::Protocol(what)))
        }
    }
}
