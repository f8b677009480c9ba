//! Switchboard over TCP (length-prefixed protobuf) or the WebSocket bridge (binary subprotocol),
//! speaking the wire protocol directly (no client library in the measured path).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use switchboard_protocol::{
    ClientCodec, ClientFrame, Content, ConversationKind, ServerFrame, client_frame, server_frame,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::{Connection, Event, Rx, Target, Tx};

pub mod client;

/// Content type of load-generator messages.
pub(crate) const CONTENT_TYPE: &str = "application/x-switchboard-loadgen";
/// Members added per request when building a room (the broker's default
/// `max_members_per_request`).
pub(crate) const MEMBERS_PER_REQUEST: usize = 500;
/// The WebSocket subprotocol of protobuf frames.
const PROTO_SUBPROTOCOL: &str = "switchboard.v1.proto";

/// How to reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The binary protocol over TCP.
    Tcp,
    /// The WebSocket bridge, binary subprotocol.
    Ws,
}

/// A Switchboard broker.
#[derive(Clone)]
pub struct Switchboard {
    addr: SocketAddr,
    transport: Transport,
    secret: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Switchboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switchboard")
            .field("addr", &self.addr)
            .field("transport", &self.transport)
            .finish()
    }
}

impl Switchboard {
    /// A broker at `addr` (the TCP port, or the HTTP port for `Ws`); tokens are signed with
    /// `secret` (the broker's HS256 secret).
    #[must_use]
    pub fn new(addr: SocketAddr, transport: Transport, secret: Vec<u8>) -> Self {
        Self { addr, transport, secret: Arc::new(secret) }
    }

    /// The broker's address (TCP port, or HTTP port for WebSocket).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How the broker is reached.
    #[must_use]
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// A token for `user`, valid for a day.
    ///
    /// # Errors
    /// When signing fails.
    pub fn token(&self, user: &str) -> anyhow::Result<String> {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            sub: &'a str,
            exp: u64,
        }
        let exp = jsonwebtoken::get_current_timestamp() + 24 * 3600;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &Claims { sub: user, exp },
            &jsonwebtoken::EncodingKey::from_secret(&self.secret),
        )?)
    }
}

type TcpRead = FramedRead<tokio::net::tcp::OwnedReadHalf, ClientCodec>;
type TcpWrite = FramedWrite<tokio::net::tcp::OwnedWriteHalf, ClientCodec>;
type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An open connection.
pub enum Conn {
    /// Over TCP.
    Tcp(TcpRead, TcpWrite, u64),
    /// Over WebSocket.
    Ws(WsStream, u64),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp(..) => "Conn::Tcp",
            Self::Ws(..) => "Conn::Ws",
        })
    }
}

impl Conn {
    async fn write(&mut self, frame: &ClientFrame) -> anyhow::Result<()> {
        match self {
            Self::Tcp(_, w, _) => w.send(frame).await.map_err(Into::into),
            Self::Ws(ws, _) => {
                ws.send(WsMessage::Binary(frame.encode_to_vec().into())).await.map_err(Into::into)
            }
        }
    }

    async fn read(&mut self) -> anyhow::Result<ServerFrame> {
        match self {
            Self::Tcp(r, _, _) => {
                r.next().await.ok_or_else(|| anyhow!("connection closed"))?.map_err(Into::into)
            }
            Self::Ws(ws, _) => loop {
                match ws.next().await.ok_or_else(|| anyhow!("connection closed"))?? {
                    WsMessage::Binary(b) => return Ok(ServerFrame::decode(b)?),
                    WsMessage::Close(_) => bail!("connection closed"),
                    _ => {}
                }
            },
        }
    }

    /// Sends a setup request and waits for its reply (pushes before it are skipped).
    async fn request(&mut self, kind: client_frame::Kind) -> anyhow::Result<server_frame::Kind> {
        let id = match self {
            Self::Tcp(_, _, n) | Self::Ws(_, n) => {
                *n += 1;
                *n
            }
        };
        self.write(&ClientFrame::request(id, kind)).await?;
        loop {
            let f = self.read().await?;
            if f.request_id == id {
                return match f.kind {
                    Some(server_frame::Kind::Error(e)) => {
                        bail!(
                            "{}: {}",
                            switchboard_protocol::ErrorCode::try_from(e.code).unwrap_or_default(),
                            e.message
                        )
                    }
                    Some(k) => Ok(k),
                    None => bail!("empty reply"),
                };
            }
        }
    }
}

/// Upgrades `stream` to the broker's WebSocket bridge with the protobuf subprotocol.
pub(crate) async fn ws_handshake(
    stream: tokio::net::TcpStream,
    addr: SocketAddr,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(PROTO_SUBPROTOCOL));
    let (ws, _) =
        tokio_tungstenite::client_async(req, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await?;
    Ok(ws)
}

impl Target for Switchboard {
    type Conn = Conn;

    fn name(&self) -> String {
        match self.transport {
            Transport::Tcp => "switchboard-tcp".into(),
            Transport::Ws => "switchboard-ws".into(),
        }
    }

    fn acks(&self) -> bool {
        true
    }

    async fn connect(&self, user: &str, local: Option<IpAddr>) -> anyhow::Result<Conn> {
        let stream = super::tcp(self.addr, local)
            .await
            .with_context(|| format!("connect {} from {local:?}", self.addr))?;
        let mut conn = match self.transport {
            Transport::Tcp => {
                let (r, w) = stream.into_split();
                Conn::Tcp(
                    FramedRead::new(r, ClientCodec::new(16 << 20)),
                    FramedWrite::new(w, ClientCodec::new(16 << 20)),
                    0,
                )
            }
            Transport::Ws => Conn::Ws(ws_handshake(stream, self.addr).await?, 0),
        };
        let hello = client_frame::Kind::Hello(switchboard_protocol::Hello {
            protocol_version: switchboard_protocol::PROTOCOL_VERSION,
            token: self.token(user)?,
            resume: None,
            client: "switchboard-loadgen".into(),
        });
        match tokio::time::timeout(Duration::from_secs(30), conn.request(hello)).await?? {
            server_frame::Kind::Welcome(_) => Ok(conn),
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    async fn direct(&self, conn: &mut Conn, _a: &str, b: &str) -> anyhow::Result<String> {
        let req =
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: ConversationKind::Direct as i32,
                members: vec![b.to_owned()],
                ..Default::default()
            });
        match conn.request(req).await? {
            server_frame::Kind::Conversation(c) => Ok(c.conversation_id),
            other => bail!("expected Conversation, got {other:?}"),
        }
    }

    async fn room(
        &self,
        conn: &mut Conn,
        owner: &str,
        members: &[String],
    ) -> anyhow::Result<String> {
        let others: Vec<String> = members.iter().filter(|m| *m != owner).cloned().collect();
        let mut chunks = others.chunks(MEMBERS_PER_REQUEST);
        let first = chunks.next().unwrap_or_default().to_vec();
        let req =
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: ConversationKind::Group as i32,
                name: "loadgen room".into(),
                members: first,
                ..Default::default()
            });
        let conv = match conn.request(req).await? {
            server_frame::Kind::Conversation(c) => c.conversation_id,
            other => bail!("expected Conversation, got {other:?}"),
        };
        for chunk in chunks {
            let req = client_frame::Kind::AddMembers(switchboard_protocol::AddMembers {
                conversation_id: conv.clone(),
                users: chunk.to_vec(),
            });
            conn.request(req).await?;
        }
        Ok(conv)
    }
}

/// Sending half.
pub enum SbTx {
    /// Over TCP.
    Tcp(TcpWrite),
    /// Over WebSocket.
    Ws(futures::stream::SplitSink<WsStream, WsMessage>),
}

/// Receiving half.
pub enum SbRx {
    /// Over TCP.
    Tcp(TcpRead),
    /// Over WebSocket.
    Ws(futures::stream::SplitStream<WsStream>),
}

impl Connection for Conn {
    type Tx = SbTx;
    type Rx = SbRx;

    async fn join(&mut self, _channel: &str) -> anyhow::Result<()> {
        // Membership is the subscription: the broker delivers every conversation a user is in.
        Ok(())
    }

    fn split(self) -> (SbTx, SbRx) {
        match self {
            Self::Tcp(r, w, _) => (SbTx::Tcp(w), SbRx::Tcp(r)),
            Self::Ws(ws, _) => {
                let (tx, rx) = ws.split();
                (SbTx::Ws(tx), SbRx::Ws(rx))
            }
        }
    }
}

fn send_frame(channel: &str, id: u64, payload: Bytes) -> ClientFrame {
    ClientFrame::request(
        id,
        client_frame::Kind::Send(switchboard_protocol::Send {
            conversation_id: channel.to_owned(),
            client_msg_id: format!("{id:x}"),
            content: Some(Content::data(CONTENT_TYPE, payload)),
        }),
    )
}

impl Tx for SbTx {
    async fn send(&mut self, channel: &str, id: u64, payload: Bytes) -> anyhow::Result<()> {
        let frame = send_frame(channel, id, payload);
        match self {
            Self::Tcp(w) => w.feed(&frame).await?,
            Self::Ws(w) => w.feed(WsMessage::Binary(frame.encode_to_vec().into())).await?,
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Tcp(w) => SinkExt::<&ClientFrame>::flush(w).await?,
            Self::Ws(w) => w.flush().await?,
        }
        Ok(())
    }

    async fn ping(&mut self) -> anyhow::Result<()> {
        let frame =
            ClientFrame::request(1, client_frame::Kind::Ping(switchboard_protocol::Ping {}));
        match self {
            Self::Tcp(w) => w.send(&frame).await?,
            Self::Ws(w) => w.send(WsMessage::Binary(frame.encode_to_vec().into())).await?,
        }
        Ok(())
    }
}

fn event(f: ServerFrame) -> Option<Event> {
    match f.kind? {
        server_frame::Kind::SendAck(_) => Some(Event::Ack(f.request_id)),
        server_frame::Kind::Message(m) => match m.content?.body? {
            switchboard_protocol::content::Body::Data(d) => Some(Event::Delivery(d)),
            switchboard_protocol::content::Body::Text(_) => None,
        },
        server_frame::Kind::Error(e) => Some(Event::Error(
            switchboard_protocol::ErrorCode::try_from(e.code)
                .unwrap_or_default()
                .as_str_name()
                .to_owned(),
            Some(f.request_id).filter(|id| *id > 0),
        )),
        server_frame::Kind::Disconnect(d) => Some(Event::Error(
            switchboard_protocol::DisconnectReason::try_from(d.reason)
                .unwrap_or_default()
                .as_str_name()
                .to_owned(),
            None,
        )),
        _ => None,
    }
}

impl Rx for SbRx {
    async fn next(&mut self) -> Option<Event> {
        loop {
            let frame = match self {
                Self::Tcp(r) => r.next().await?.ok()?,
                Self::Ws(r) => match r.next().await?.ok()? {
                    WsMessage::Binary(b) => ServerFrame::decode(b).ok()?,
                    WsMessage::Close(_) => return None,
                    _ => continue,
                },
            };
            if let Some(e) = event(frame) {
                return Some(e);
            }
        }
    }
}
