//! Switchboard through its Rust client crate (`switchboard-client`), for the scenarios that
//! exercise chat behaviour (resync after reconnect, receipts, typing, presence): a connector
//! over TCP or the WebSocket bridge, with a kill switch that drops the current connection the
//! way a network failure would, and holds the user offline for a while before the client's
//! own reconnect goes through.
//!
//! Over WebSocket the client's length-prefixed frames are carried one per binary message (the
//! `switchboard.v1.proto` subprotocol) by a small pump task between the client and the socket.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use switchboard_client::{Client, ClientBuilder, ReconnectPolicy};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{Switchboard, Transport};

/// The largest frame the WebSocket pump passes (the client's own ceiling).
const MAX_FRAME: usize = 16 << 20;

/// Drops a client's connection on demand and keeps it away for a while.
#[derive(Debug, Default)]
pub struct KillSwitch {
    state: Mutex<KillState>,
}

#[derive(Debug, Default)]
struct KillState {
    current: Option<CancellationToken>,
    offline_until: Option<Instant>,
    attempt_started: Option<Instant>,
}

impl KillSwitch {
    fn state(&self) -> std::sync::MutexGuard<'_, KillState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops the current connection (if any) and refuses to connect for `offline`.
    /// Returns whether a connection was dropped.
    pub fn kill(&self, offline: Duration) -> bool {
        let mut s = self.state();
        s.offline_until = Some(Instant::now() + offline);
        s.current.take().is_some_and(|t| {
            t.cancel();
            true
        })
    }

    /// When the latest connection attempt started (after any offline wait).
    #[must_use]
    pub fn attempt_started(&self) -> Option<Instant> {
        self.state().attempt_started
    }

    /// Whether the user is held offline now.
    #[must_use]
    pub fn offline(&self) -> bool {
        self.state().offline_until.is_some_and(|t| t > Instant::now())
    }
}

/// An I/O stream that fails once its token is cancelled.
struct Killable<S> {
    inner: S,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
    dead: bool,
}

impl<S> Killable<S> {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.killed.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "killed by the load generator",
            ));
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Killable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Killable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A byte stream the client can use.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Options for a client of `target` as `user`, connecting from `local`, killable through
/// `kill`. The caller adds its own options (delivery receipts, …) and connects.
///
/// # Errors
/// When the token cannot be signed.
pub fn builder(
    target: &Switchboard,
    user: &str,
    local: Option<IpAddr>,
    kill: Arc<KillSwitch>,
) -> anyhow::Result<ClientBuilder> {
    let addr = target.addr();
    let transport = target.transport();
    Ok(Client::builder(addr.to_string())
        .token(target.token(user)?)
        .client_name("switchboard-loadgen")
        // Reconnect promptly: the kill switch's offline time is the only wait wanted.
        .reconnect(ReconnectPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_secs(2),
            enabled: true,
        })
        .connect_timeout(Duration::from_secs(30))
        .connector(move || {
            let kill = Arc::clone(&kill);
            async move {
                let until = kill.state().offline_until;
                if let Some(until) = until {
                    tokio::time::sleep_until(until.into()).await;
                }
                kill.state().attempt_started = Some(Instant::now());
                let stream = crate::target::tcp(addr, local).await?;
                let io: Box<dyn Io> = match transport {
                    Transport::Tcp => Box::new(stream),
                    Transport::Ws => Box::new(websocket(stream, addr).await?),
                };
                let token = CancellationToken::new();
                kill.state().current = Some(token.clone());
                Ok(Killable { inner: io, killed: Box::pin(token.cancelled_owned()), dead: false })
            }
        }))
}

/// Opens the WebSocket bridge over `stream` and returns the client's end of a pump that turns
/// length-prefixed frames into binary messages and back.
async fn websocket(stream: TcpStream, addr: SocketAddr) -> io::Result<tokio::io::DuplexStream> {
    let ws = super::ws_handshake(stream, addr).await.map_err(io::Error::other)?;
    let (client_end, pump_end) = tokio::io::duplex(256 * 1024);
    tokio::spawn(pump(ws, pump_end));
    Ok(client_end)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Moves frames between the client (length-prefixed bytes) and the WebSocket (one binary
/// message per frame) until either side ends; ending drops both.
async fn pump(ws: Ws, io: tokio::io::DuplexStream) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (r, mut w) = tokio::io::split(io);
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec();
    let mut frames = FramedRead::new(r, codec);
    loop {
        tokio::select! {
            f = frames.next() => {
                let Some(Ok(frame)) = f else { break };
                if ws_tx.send(WsMessage::Binary(frame.freeze())).await.is_err() {
                    break;
                }
            }
            m = ws_rx.next() => match m {
                Some(Ok(WsMessage::Binary(b))) => {
                    if write_frame(&mut w, &b).await.is_err() {
                        break;
                    }
                }
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = ws_tx.close().await;
}

async fn write_frame(
    w: &mut tokio::io::WriteHalf<tokio::io::DuplexStream>,
    b: &Bytes,
) -> io::Result<()> {
    let len = u32::try_from(b.len()).map_err(io::Error::other)?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(b).await
}
