//! The WebSocket transport: the same [`Session`] as TCP, over one of two subprotocols.
//!
//! - `switchboard.v1.proto`: one protobuf `ClientFrame`/`ServerFrame` per binary message. A
//!   delivery is sent as the shared encoded bytes without their 4-byte prefix (no copy).
//! - `switchboard.v1.json`: one JSON `ClientFrame`/`ServerFrame` per text message (canonical
//!   protobuf JSON mapping). A delivery's JSON is produced once and shared by every JSON session.
//!
//! Limits follow the protocol's: a message (and a frame) may be `max_frame_bytes` (binary) or
//! 4/3 of it plus 1 KiB (JSON); larger ones get `Error{TOO_LARGE}`, `Disconnect` and a close.
//! The read buffer is 4 KiB (tungstenite's default is 128 KiB per connection); no
//! permessage-deflate. WebSocket pings and pongs count as activity for the read deadline.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use prost::Message as _;
use switchboard_protocol::{ClientFrame, FrameError, SharedFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::Instrument;

use super::session::Session;
use crate::metrics::Transport;
use crate::shard::Shard;
use crate::shard::outbound::Outbound;

/// The binary subprotocol.
pub const PROTO_BINARY: &str = "switchboard.v1.proto";
/// The JSON subprotocol.
pub const PROTO_JSON: &str = "switchboard.v1.json";

/// Frames taken from the queue per flush.
const FRAMES_PER_WRITE: usize = 64;
/// A write or flush that makes no progress for this long closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to flush its last frames.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read from the socket at a time.
const READ_BUFFER: usize = 2 * 1024;
/// Bytes buffered before a write goes to the socket (a flush always writes).
const WRITE_BUFFER: usize = 64 * 1024;

/// Which encoding the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    /// Protobuf in binary messages.
    Binary,
    /// Canonical protobuf JSON in text messages.
    Json,
}

impl Subprotocol {
    /// The subprotocol named in a `Sec-WebSocket-Protocol` entry.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name.trim() {
            PROTO_BINARY => Some(Self::Binary),
            PROTO_JSON => Some(Self::Json),
            _ => None,
        }
    }

    /// Its registered name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Binary => PROTO_BINARY,
            Self::Json => PROTO_JSON,
        }
    }

    /// The largest message accepted: the frame limit, or for JSON 4/3 of it plus 1 KiB.
    #[must_use]
    pub fn max_message(self, max_frame: usize) -> usize {
        match self {
            Self::Binary => max_frame,
            Self::Json => max_frame / 3 * 4 + 1024,
        }
    }
}

/// Serves one upgraded WebSocket connection until it closes.
pub async fn serve<S>(shard: Rc<Shard>, io: S, peer: SocketAddr, proto: Subprotocol)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let max = proto.max_message(shard.config.limits.max_frame_bytes);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + 2 * max)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .accept_unmasked_frames(false);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let session = Session::new(shard, peer, Transport::Ws);
    let span = session.span().clone();
    async move {
        tracing::debug!(subprotocol = proto.name(), "connected");
        let (sink, stream) = ws.split();
        let writer = tokio::task::spawn_local(write_loop(
            sink,
            session.out.clone(),
            session.shard.clone(),
            proto,
        ));
        read_loop(&session, stream).await;
        session.finish();
        session.out.close();
        let mut writer = writer;
        if tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await.is_err() {
            writer.abort();
        }
        tracing::debug!("disconnected");
    }
    .instrument(span)
    .await;
}

async fn read_loop<S>(
    session: &Session,
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut now = tokio::time::Instant::now();
    let mut deadline = session.read_deadline(now);
    loop {
        let next = tokio::select! {
            () = session.cancel.cancelled() => {
                session.on_cancel();
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                session.on_read_timeout();
                return;
            }
            next = stream.next() => next,
        };
        // No earlier than the message's arrival: its token check uses it.
        now = tokio::time::Instant::now();
        let frame = match next {
            None => return,
            Some(Err(WsError::Capacity(e))) => {
                let (len, max) = match e {
                    CapacityError::MessageTooLong { size, max_size } => (size, max_size),
                    CapacityError::TooManyHeaders => (0, 0),
                };
                session.on_frame_error(&FrameError::TooLarge { len, max });
                return;
            }
            Some(Err(_)) => return,
            Some(Ok(Message::Binary(bytes))) => {
                let len = bytes.len();
                ClientFrame::decode(bytes).map(|f| (f, len)).map_err(|e| e.to_string())
            }
            Some(Ok(Message::Text(text))) => {
                switchboard_protocol::json::decode_client(text.as_str())
                    .map(|f| (f, text.len()))
                    .map_err(|e| e.to_string())
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                // Keepalive counts as activity once authenticated (before Hello the deadline
                // stays absolute); tungstenite answers pings itself.
                if session.is_authenticated() {
                    deadline = session.read_deadline(now);
                }
                continue;
            }
            Some(Ok(Message::Close(_))) => return,
            Some(Ok(Message::Frame(_))) => continue,
        };
        match frame {
            Ok((frame, len)) => {
                let Some(at) = session.take_frame(frame, len, now).await else { return };
                now = at;
                deadline = session.read_deadline(now);
            }
            Err(why) => {
                session.on_malformed(&format!("malformed frame: {why}"));
                return;
            }
        }
    }
}

fn to_message(frame: &SharedFrame, proto: Subprotocol) -> Option<Message> {
    match proto {
        Subprotocol::Binary => Some(Message::Binary(frame.payload())),
        Subprotocol::Json => {
            let json = frame.json().ok()?;
            Utf8Bytes::try_from(json).ok().map(Message::Text)
        }
    }
}

async fn write_loop<S>(
    mut sink: futures::stream::SplitSink<WebSocketStream<S>, Message>,
    out: Rc<Outbound>,
    shard: Rc<Shard>,
    proto: Subprotocol,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        out.ready().await;
        let mut batch: Vec<SharedFrame> = Vec::new();
        out.drain(FRAMES_PER_WRITE, &mut batch);
        if batch.is_empty() {
            break;
        }
        let mut sizes = Vec::with_capacity(batch.len());
        let write = async {
            for frame in &batch {
                if let Some(msg) = to_message(frame, proto) {
                    sizes.push((frame.kind(), msg.len()));
                    sink.feed(msg).await?;
                }
            }
            sink.flush().await
        };
        let written = tokio::time::timeout(WRITE_TIMEOUT, write).await;
        match written {
            Ok(Ok(())) => {
                for (kind, len) in sizes {
                    shard.stats.frame_out(Transport::Ws, kind, len);
                }
            }
            Ok(Err(_)) | Err(_) => {
                if written.is_err() {
                    metrics::counter!(crate::metrics::SLOW_CONSUMERS, "reason" => "write_timeout")
                        .increment(1);
                }
                // The peer stopped reading or the socket broke; closing the queue stops the
                // reader too.
                out.close();
                return;
            }
        }
    }
    let close = CloseFrame { code: CloseCode::Normal, reason: Utf8Bytes::from_static("") };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        let _ = sink.send(Message::Close(Some(close))).await;
        let _ = sink.close().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_subprotocol_names_should_map_both_ways_and_size_json_larger() {
        assert_eq!(Subprotocol::from_name(" switchboard.v1.json"), Some(Subprotocol::Json));
        assert_eq!(Subprotocol::from_name(PROTO_BINARY).map(Subprotocol::name), Some(PROTO_BINARY));
        assert_eq!(Subprotocol::from_name("chat"), None);
        assert_eq!(Subprotocol::Binary.max_message(3 << 20), 3 << 20);
        assert_eq!(Subprotocol::Json.max_message(3 << 20), (4 << 20) + 1024);
    }
}
