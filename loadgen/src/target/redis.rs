//! Redis, pub/sub (`redis://`) and streams (`redis+stream://`), through the `redis` crate.
//!
//! # Semantics, next to Switchboard's
//! - **Two sockets per client.** A RESP2 connection that has subscribed can only
//!   (un)subscribe and ping, so each client opens a command connection (sends, pings) and a
//!   second one to receive on. Both are opened by `connect`, also in the `connect` scenario: a
//!   chat client needs both, so "bytes per connection" for Redis is per client, two sockets.
//! - **Channels.** `lg:d:<a>:<b>` for the pair `a`, `b` (sorted) and `lg:r:<owner>` for a room;
//!   streams use the prefix `lgs:`. User names are unique per run, so the names are too.
//! - **Pub/sub, and what counts as the ack.** A send is `PUBLISH`; `join` subscribes the
//!   receiving connection. The integer reply to `PUBLISH` is taken as the [`Event::Ack`]
//!   ([`Target::acks`] is true): Redis sends it once it has handed the message to every
//!   subscriber's output buffer, which is the nearest thing to Switchboard's `SendAck` in
//!   `buffered` durability (accepted and routed, nothing fsynced) and, like it, comes back to
//!   the publisher on the connection it sent on. Taking the publisher's own echo instead
//!   would add a trip through the subscriber socket that Switchboard's ack does not make.
//!   Redis cannot leave the publisher out, so in `direct` the publisher's receiving
//!   connection still gets its own messages; the runner skips them.
//! - **Streams (durable).** A send is `XADD <key> * p <payload>` (the server is expected to
//!   run with `appendonly yes`, `appendfsync always`, so the reply comes after the fsync); the
//!   reply (the entry id) is the [`Event::Ack`]. `join` notes the stream's last entry id (the
//!   `$` of that moment, without `$`'s race against the first send); a task per client then
//!   loops `XREAD COUNT … BLOCK 1000 STREAMS …` from the ids seen, so every member reads each
//!   stored message once. Streams are not trimmed during a run.
//! - **Batching and in-flight sends.** Sends queue in a pipeline; `flush` writes it and does
//!   not wait: the replies are awaited by a task and come back through the receiving half, so
//!   many sends stay in flight per client.
//! - **Keepalive.** [`Tx::ping`] sends `PING` on both sockets (on the command socket only for
//!   streams, whose reading socket is never idle for more than a second).

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub, PubSubSink, PubSubStream};
use redis::{AsyncConnectionConfig, RedisConnectionInfo, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::{Connection, Event, Rx, Target, Tx};

/// Entries one `XREAD` returns at most.
const XREAD_COUNT: usize = 1024;
/// How long one `XREAD` blocks, in milliseconds.
const XREAD_BLOCK_MS: u64 = 1000;
/// The field an entry's payload is stored under.
const FIELD: &str = "p";

/// Which Redis feature carries the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `PUBLISH` / `SUBSCRIBE`: at most once, not stored.
    PubSub,
    /// `XADD` / `XREAD`: stored (and fsynced, with `appendfsync always`).
    Stream,
}

impl Mode {
    /// The first part of this mode's channel names.
    #[must_use]
    pub fn prefix(self) -> &'static str {
        match self {
            Self::PubSub => "lg",
            Self::Stream => "lgs",
        }
    }
}

/// The channel (or stream key) between `a` and `b`, the same for either order.
#[must_use]
pub fn direct_key(mode: Mode, a: &str, b: &str) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    format!("{}:d:{a}:{b}", mode.prefix())
}

/// The channel (or stream key) of the room `owner` created.
#[must_use]
pub fn room_key(mode: Mode, owner: &str) -> String {
    format!("{}:r:{owner}", mode.prefix())
}

/// A Redis server.
#[derive(Clone)]
pub struct Redis {
    addr: SocketAddr,
    mode: Mode,
    info: RedisConnectionInfo,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("addr", &self.addr).field("mode", &self.mode).finish()
    }
}

impl Redis {
    /// A server at `addr`.
    ///
    /// # Errors
    /// When the address does not make a valid Redis URL.
    pub fn new(addr: SocketAddr, mode: Mode) -> anyhow::Result<Self> {
        let client = redis::Client::open(format!("redis://{addr}/"))?;
        let info = client.get_connection_info().redis_settings().clone();
        Ok(Self { addr, mode, info })
    }

    async fn socket(&self, local: Option<IpAddr>) -> anyhow::Result<TcpStream> {
        super::tcp(self.addr, local)
            .await
            .with_context(|| format!("connect redis://{} from {local:?}", self.addr))
    }

    async fn command_connection(
        &self,
        local: Option<IpAddr>,
    ) -> anyhow::Result<MultiplexedConnection> {
        let stream = self.socket(local).await?;
        // No response timeout: a long pipeline or a blocking XREAD may take longer than the
        // crate's default of 500 ms, and a lost reply shows up as a missing ack anyway.
        let config = AsyncConnectionConfig::new().set_response_timeout(None);
        let (conn, driver) =
            MultiplexedConnection::new_with_config(&self.info, stream, config).await?;
        tokio::spawn(driver);
        Ok(conn)
    }
}

/// The receiving socket of a client.
enum Receiving {
    /// Subscribed to channels.
    PubSub(PubSub),
    /// Reads streams from these ids.
    Stream(MultiplexedConnection, Vec<(String, String)>),
}

/// An open client: a command connection and a receiving connection.
pub struct RedisConn {
    mode: Mode,
    commands: MultiplexedConnection,
    receiving: Receiving,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConn").field("mode", &self.mode).finish()
    }
}

impl Target for Redis {
    type Conn = RedisConn;

    fn name(&self) -> String {
        match self.mode {
            Mode::PubSub => "redis-pubsub".into(),
            Mode::Stream => "redis-stream".into(),
        }
    }

    fn acks(&self) -> bool {
        true
    }

    async fn connect(&self, _user: &str, local: Option<IpAddr>) -> anyhow::Result<RedisConn> {
        let commands = self.command_connection(local).await?;
        let receiving = match self.mode {
            Mode::PubSub => {
                let stream = self.socket(local).await?;
                Receiving::PubSub(PubSub::new(&self.info, stream).await?)
            }
            Mode::Stream => Receiving::Stream(self.command_connection(local).await?, Vec::new()),
        };
        Ok(RedisConn { mode: self.mode, commands, receiving })
    }

    async fn direct(&self, _conn: &mut RedisConn, a: &str, b: &str) -> anyhow::Result<String> {
        Ok(direct_key(self.mode, a, b))
    }

    async fn room(
        &self,
        _conn: &mut RedisConn,
        owner: &str,
        _members: &[String],
    ) -> anyhow::Result<String> {
        Ok(room_key(self.mode, owner))
    }
}

/// The id of the newest entry of a stream, from an `XREVRANGE key + - COUNT 1` reply;
/// `0-0` when the stream is empty or missing.
fn last_id(reply: &Value) -> String {
    if let Value::Array(entries) = reply
        && let Some(Value::Array(entry)) = entries.first()
        && let Some(id) = entry.first().and_then(text)
    {
        return id;
    }
    "0-0".into()
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The entries of an `XREAD` reply as (key, id, payload), RESP2 (array) or RESP3 (map).
/// A timed-out read (`nil`) has none.
fn read_entries(reply: Value) -> Vec<(String, String, Bytes)> {
    let streams: Vec<(Value, Value)> = match reply {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    let key = kv.pop()?;
                    Some((key, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv,
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (key, entries) in streams {
        let Some(key) = text(&key) else { continue };
        let Value::Array(entries) = entries else { continue };
        for entry in entries {
            let Value::Array(mut parts) = entry else { continue };
            if parts.len() != 2 {
                continue;
            }
            let (Some(fields), Some(id)) = (parts.pop(), parts.pop()) else { continue };
            let Some(id) = text(&id) else { continue };
            let Value::Array(fields) = fields else { continue };
            let mut it = fields.into_iter();
            while let (Some(name), Some(value)) = (it.next(), it.next()) {
                if text(&name).as_deref() == Some(FIELD)
                    && let Value::BulkString(b) = value
                {
                    out.push((key.clone(), id.clone(), Bytes::from(b)));
                }
            }
        }
    }
    out
}

/// Reads `streams` from their ids until the receiving half goes away.
async fn read_streams(
    mut conn: MultiplexedConnection,
    mut streams: Vec<(String, String)>,
    out: mpsc::Sender<Vec<Event>>,
) {
    if streams.is_empty() {
        return;
    }
    while !out.is_closed() {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(XREAD_COUNT).arg("BLOCK").arg(XREAD_BLOCK_MS).arg("STREAMS");
        for (key, _) in &streams {
            cmd.arg(key);
        }
        for (_, id) in &streams {
            cmd.arg(id);
        }
        let events = match conn.send_packed_command(&cmd).await {
            Ok(reply) => {
                let entries = read_entries(reply);
                let mut events = Vec::with_capacity(entries.len());
                for (key, id, payload) in entries {
                    if let Some(s) = streams.iter_mut().find(|(k, _)| *k == key) {
                        s.1 = id;
                    }
                    events.push(Event::Delivery(payload));
                }
                events
            }
            Err(e) => {
                let _ = out
                    .send(vec![Event::Error(format!("redis XREAD: {:?}", e.kind()), None)])
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !events.is_empty() && out.send(events).await.is_err() {
            return;
        }
    }
}

/// Sending half.
pub struct RedisTx {
    mode: Mode,
    commands: MultiplexedConnection,
    subscriber: Option<PubSubSink>,
    pipe: redis::Pipeline,
    ids: Vec<u64>,
    acks: mpsc::UnboundedSender<Vec<Event>>,
}

impl std::fmt::Debug for RedisTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTx")
            .field("mode", &self.mode)
            .field("queued", &self.ids.len())
            .finish()
    }
}

/// Receiving half: deliveries, and the replies to sends.
pub struct RedisRx {
    messages: Option<PubSubStream>,
    batches: Option<mpsc::Receiver<Vec<Event>>>,
    acks: mpsc::UnboundedReceiver<Vec<Event>>,
    ready: VecDeque<Event>,
}

impl std::fmt::Debug for RedisRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRx").field("ready", &self.ready.len()).finish()
    }
}

impl Connection for RedisConn {
    type Tx = RedisTx;
    type Rx = RedisRx;

    async fn join(&mut self, channel: &str) -> anyhow::Result<()> {
        match &mut self.receiving {
            Receiving::PubSub(sub) => {
                sub.subscribe(channel).await.with_context(|| format!("SUBSCRIBE {channel}"))?;
            }
            Receiving::Stream(conn, streams) => {
                let mut cmd = redis::cmd("XREVRANGE");
                cmd.arg(channel).arg("+").arg("-").arg("COUNT").arg(1);
                let reply = conn
                    .send_packed_command(&cmd)
                    .await
                    .with_context(|| format!("XREVRANGE {channel}"))?;
                if let Value::ServerError(e) = &reply {
                    bail!("XREVRANGE {channel}: {e:?}");
                }
                streams.push((channel.to_owned(), last_id(&reply)));
            }
        }
        Ok(())
    }

    fn split(self) -> (RedisTx, RedisRx) {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (subscriber, messages, batches) = match self.receiving {
            Receiving::PubSub(sub) => {
                let (sink, stream) = sub.split();
                (Some(sink), Some(stream), None)
            }
            Receiving::Stream(conn, streams) => {
                let (tx, rx) = mpsc::channel(64);
                tokio::spawn(read_streams(conn, streams, tx));
                (None, None, Some(rx))
            }
        };
        (
            RedisTx {
                mode: self.mode,
                commands: self.commands,
                subscriber,
                pipe: redis::pipe(),
                ids: Vec::new(),
                acks: ack_tx,
            },
            RedisRx { messages, batches, acks: ack_rx, ready: VecDeque::new() },
        )
    }
}

/// The event a send's reply makes.
fn reply_event(id: u64, reply: &Value) -> Event {
    match reply {
        Value::ServerError(e) => Event::Error(format!("redis: {}", e.code()), Some(id)),
        _ => Event::Ack(id),
    }
}

impl Tx for RedisTx {
    async fn send(&mut self, channel: &str, id: u64, payload: Bytes) -> anyhow::Result<()> {
        match self.mode {
            Mode::PubSub => self.pipe.cmd("PUBLISH").arg(channel).arg(payload.as_ref()),
            Mode::Stream => {
                self.pipe.cmd("XADD").arg(channel).arg("*").arg(FIELD).arg(payload.as_ref())
            }
        };
        self.ids.push(id);
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let pipe = std::mem::replace(&mut self.pipe, redis::pipe());
        let ids = std::mem::take(&mut self.ids);
        let mut conn = self.commands.clone();
        let acks = self.acks.clone();
        tokio::spawn(async move {
            let events = match conn.send_packed_commands(&pipe, 0, ids.len()).await {
                Ok(replies) => {
                    ids.iter().zip(replies.iter()).map(|(id, r)| reply_event(*id, r)).collect()
                }
                Err(e) => {
                    let code = format!("redis: {:?}", e.kind());
                    ids.into_iter().map(|id| Event::Error(code.clone(), Some(id))).collect()
                }
            };
            let _ = acks.send(events);
        });
        Ok(())
    }

    async fn ping(&mut self) -> anyhow::Result<()> {
        redis::cmd("PING").query_async::<Value>(&mut self.commands).await?;
        if let Some(sub) = &mut self.subscriber {
            sub.ping::<Value>().await?;
        }
        Ok(())
    }
}

impl Rx for RedisRx {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            tokio::select! {
                Some(acks) = self.acks.recv() => self.ready.extend(acks),
                m = async {
                    match &mut self.messages {
                        Some(s) => s.next().await,
                        None => std::future::pending().await,
                    }
                }, if self.messages.is_some() => match m {
                    Some(m) => {
                        return Some(Event::Delivery(Bytes::copy_from_slice(m.get_payload_bytes())));
                    }
                    None => {
                        // Redis closed the subscription (e.g. the output buffer limit was hit).
                        self.messages = None;
                        return Some(Event::Error("redis: subscriber connection closed".into(), None));
                    }
                },
                Some(batch) = async {
                    match &mut self.batches {
                        Some(b) => b.recv().await,
                        None => None,
                    }
                } => self.ready.extend(batch),
                else => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn given_pair_in_either_order_when_naming_key_should_be_the_same() {
        assert_eq!(direct_key(Mode::PubSub, "x-b1", "x-a1"), "lg:d:x-a1:x-b1");
        assert_eq!(direct_key(Mode::Stream, "x-a1", "x-b1"), "lgs:d:x-a1:x-b1");
        assert_eq!(room_key(Mode::Stream, "o"), "lgs:r:o");
    }

    #[test]
    fn given_xread_reply_when_parsed_should_yield_payloads_with_their_ids() {
        let entry = |id: &str, p: &str| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk(FIELD), bulk(p)])])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                bulk("k1"),
                Value::Array(vec![entry("1-0", "a"), entry("1-1", "b")]),
            ]),
            Value::Array(vec![bulk("k2"), Value::Array(vec![entry("2-0", "c")])]),
        ]);
        let got = read_entries(reply);
        assert_eq!(
            got,
            vec![
                ("k1".into(), "1-0".into(), Bytes::from_static(b"a")),
                ("k1".into(), "1-1".into(), Bytes::from_static(b"b")),
                ("k2".into(), "2-0".into(), Bytes::from_static(b"c")),
            ]
        );
        assert!(read_entries(Value::Nil).is_empty());
        let resp3 = Value::Map(vec![(bulk("k"), Value::Array(vec![entry("3-0", "d")]))]);
        assert_eq!(read_entries(resp3).len(), 1);
    }

    #[test]
    fn given_xrevrange_reply_when_reading_last_id_should_default_to_zero() {
        let reply = Value::Array(vec![Value::Array(vec![bulk("5-2"), Value::Array(vec![])])]);
        assert_eq!(last_id(&reply), "5-2");
        assert_eq!(last_id(&Value::Array(vec![])), "0-0");
        assert_eq!(last_id(&Value::Nil), "0-0");
    }

    #[test]
    fn given_replies_when_mapped_should_ack_or_report_the_error() {
        assert!(matches!(reply_event(3, &Value::Int(2)), Event::Ack(3)));
        assert!(matches!(reply_event(4, &bulk("1-0")), Event::Ack(4)));
    }

    /// A `redis-server` started for one test on a free loopback port, stopped when dropped.
    struct Server {
        child: std::process::Child,
        addr: SocketAddr,
        dir: std::path::PathBuf,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn start() -> Option<Server> {
        let bin = std::env::var_os("REDIS_SERVER")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
                std::env::split_paths(&p).map(|d| d.join("redis-server")).collect::<Vec<_>>()
            }))
            .find(|p| p.is_file());
        let Some(bin) = bin else {
            println!(
                "skipped: no redis-server (set REDIS_SERVER or install Debian's redis-server)"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir =
            std::env::temp_dir().join(format!("loadgen-redis-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let child = std::process::Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
            .args(["--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Server { child, addr, dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not listen on {addr}");
    }

    /// `a` sends one message into a direct channel with `b`: `b` receives it, `a` gets the
    /// reply as its ack.
    async fn exchange(target: &Redis) {
        use crate::target::{parse, payload};
        let mut a = target.connect("t-a", None).await.unwrap();
        let mut b = target.connect("t-b", None).await.unwrap();
        let channel = target.direct(&mut a, "t-a", "t-b").await.unwrap();
        a.join(&channel).await.unwrap();
        b.join(&channel).await.unwrap();
        let (mut a_tx, mut a_rx) = a.split();
        let (_b_tx, mut b_rx) = b.split();
        a_tx.send(&channel, 7, payload(7, 0, 32)).await.unwrap();
        a_tx.flush().await.unwrap();
        let within = Duration::from_secs(10);
        match tokio::time::timeout(within, b_rx.next()).await.unwrap() {
            Some(Event::Delivery(p)) => assert_eq!(parse(&p), Some((7, 0))),
            other => panic!("expected the delivery, got {other:?}"),
        }
        loop {
            match tokio::time::timeout(within, a_rx.next()).await.unwrap() {
                Some(Event::Ack(7)) => break,
                Some(Event::Delivery(_)) => {}
                other => panic!("expected the ack, got {other:?}"),
            }
        }
        a_tx.ping().await.unwrap();
    }

    #[tokio::test]
    async fn given_pubsub_server_when_member_sends_should_deliver_and_ack_with_the_reply() {
        let Some(server) = start() else { return };
        exchange(&Redis::new(server.addr, Mode::PubSub).unwrap()).await;
    }

    #[tokio::test]
    async fn given_stream_server_when_member_sends_should_store_ack_and_deliver() {
        let Some(server) = start() else { return };
        exchange(&Redis::new(server.addr, Mode::Stream).unwrap()).await;
    }
}
