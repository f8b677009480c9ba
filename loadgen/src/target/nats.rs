//! NATS, core (`nats://`) and JetStream (`nats+js://`), through `async-nats`.
//!
//! # Semantics, next to Switchboard's
//! - **Channels.** A channel is a subject: `lg.d.<a>.<b>` for the pair `a`, `b` (sorted, so
//!   either member names the same one) and `lg.r.<owner>` for a room; JetStream runs use the
//!   prefix `lgjs.` instead. User names are made unique per run by the scenarios, so subjects
//!   are too. Characters a subject token cannot hold become `_`.
//! - **Core.** `join` subscribes; a send is a `PUB`. NATS has no acknowledgement, so
//!   [`Target::acks`] is false and every member, the publisher included, subscribes to the
//!   channel: the publisher's own copy is its "ack" (the runner counts it as such and every
//!   other member's copy as a delivery). Sends are queued in the client's write buffer and
//!   written by `flush`, so a batch of sends goes out in one write.
//! - **JetStream.** At set-up one file-storage stream (`LOADGEN`, R1, subjects `lgjs.>`) is
//!   created; the server is expected to run with `sync_interval: always`, so a `PubAck` means
//!   the message is fsynced, like Switchboard's `sync` durability (one log, as one shard has
//!   one). A send is a JetStream publish; its `PubAck` is the [`Event::Ack`], and many
//!   publishes stay in flight (the acks are awaited by the receiving half, not by the sender).
//!   `join` creates an ordered push consumer filtered on the subject, delivering only new
//!   messages: every member sees each stored message once (its own too, which the runner
//!   skips).
//! - **Keepalive.** The client pings the server after 10 s without traffic (the runner pings
//!   Switchboard every 10 s); [`Tx::ping`] only flushes.
//! - **Lost messages show up as errors.** The subscription buffer is large (the default
//!   dropped messages in fan-out runs); a client-side slow consumer, a server error or a
//!   disconnect is reported as an [`Event::Error`].

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use async_nats::{Client, ConnectOptions, Subject};
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered, SelectAll};
use futures::{Future, StreamExt};
use tokio::sync::{OnceCell, mpsc};

use super::{Connection, Event, Rx, Target, Tx};

/// The JetStream stream that holds every channel.
pub const STREAM: &str = "LOADGEN";
/// Messages a subscription buffers in the client before it drops them.
const SUBSCRIPTION_CAPACITY: usize = 1 << 20;
/// Commands the client queues before a publish waits.
const CLIENT_CAPACITY: usize = 1 << 16;
/// Largest stream before the oldest messages are discarded (bounds the disk a run uses).
const STREAM_MAX_BYTES: i64 = 8 << 30;

/// Which NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Core publish/subscribe: at most once, not stored.
    Core,
    /// JetStream: stored in a file stream, acknowledged.
    JetStream,
}

impl Flavour {
    /// The first token of this flavour's subjects.
    #[must_use]
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Core => "lg",
            Self::JetStream => "lgjs",
        }
    }
}

/// A NATS server.
#[derive(Debug, Clone)]
pub struct Nats {
    addr: SocketAddr,
    flavour: Flavour,
    stream: Arc<OnceCell<()>>,
}

impl Nats {
    /// A server at `addr`.
    #[must_use]
    pub fn new(addr: SocketAddr, flavour: Flavour) -> Self {
        Self { addr, flavour, stream: Arc::new(OnceCell::new()) }
    }

    async fn ensure_stream(&self, js: Option<&jetstream::Context>) -> anyhow::Result<()> {
        let Some(js) = js else { return Ok(()) };
        self.stream
            .get_or_try_init(|| async {
                js.get_or_create_stream(StreamConfig {
                    name: STREAM.into(),
                    subjects: vec![format!("{}.>", Flavour::JetStream.prefix())],
                    storage: StorageType::File,
                    num_replicas: 1,
                    max_bytes: STREAM_MAX_BYTES,
                    discard: DiscardPolicy::Old,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                .map_err(|e| anyhow::anyhow!("creating the JetStream stream {STREAM}: {e}"))
            })
            .await
            .copied()
    }
}

/// Makes `s` usable as one subject token: what a token cannot hold (separators, wildcards,
/// whitespace, anything not ASCII) becomes `_`.
#[must_use]
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

/// The subject of the direct channel between `a` and `b` (the same for either order).
#[must_use]
pub fn direct_subject(flavour: Flavour, a: &str, b: &str) -> String {
    let (a, b) = if a <= b { (a, b) } else { (b, a) };
    format!("{}.d.{}.{}", flavour.prefix(), token(a), token(b))
}

/// The subject of the room `owner` created.
#[must_use]
pub fn room_subject(flavour: Flavour, owner: &str) -> String {
    format!("{}.r.{}", flavour.prefix(), token(owner))
}

type Events = BoxStream<'static, Event>;
type AckFuture = Pin<Box<dyn Future<Output = Event> + Send>>;

/// An open connection (one NATS client).
pub struct NatsConn {
    client: Client,
    js: Option<jetstream::Context>,
    deliveries: SelectAll<Events>,
    problems: mpsc::UnboundedReceiver<Event>,
}

impl std::fmt::Debug for NatsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConn").field("jetstream", &self.js.is_some()).finish()
    }
}

/// What the client reports that means messages were, or may have been, lost.
fn problem(event: &async_nats::Event) -> Option<String> {
    match event {
        async_nats::Event::SlowConsumer(_) => Some("nats: slow consumer (client)".into()),
        async_nats::Event::Disconnected => Some("nats: disconnected".into()),
        async_nats::Event::ServerError(e) => Some(format!("nats: {e}")),
        async_nats::Event::ClientError(e) => Some(format!("nats: {e}")),
        _ => None,
    }
}

impl Target for Nats {
    type Conn = NatsConn;

    fn name(&self) -> String {
        match self.flavour {
            Flavour::Core => "nats-core".into(),
            Flavour::JetStream => "nats-jetstream".into(),
        }
    }

    fn acks(&self) -> bool {
        self.flavour == Flavour::JetStream
    }

    async fn connect(&self, user: &str, local: Option<IpAddr>) -> anyhow::Result<NatsConn> {
        let (report, problems) = mpsc::unbounded_channel();
        let mut options = ConnectOptions::new()
            .name(user)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .client_capacity(CLIENT_CAPACITY)
            .ping_interval(Duration::from_secs(10))
            .connection_timeout(Duration::from_secs(30))
            .request_timeout(Some(Duration::from_secs(30)))
            .event_callback(move |event| {
                let report = report.clone();
                async move {
                    if let Some(code) = problem(&event) {
                        let _ = report.send(Event::Error(code, None));
                    }
                }
            });
        if let Some(ip) = local {
            options = options.local_address(SocketAddr::new(ip, 0));
        }
        let client = options
            .connect(format!("nats://{}", self.addr))
            .await
            .with_context(|| format!("connect nats://{}", self.addr))?;
        let js = (self.flavour == Flavour::JetStream).then(|| {
            jetstream::context::ContextBuilder::new()
                .timeout(Duration::from_secs(30))
                .build(client.clone())
        });
        Ok(NatsConn { client, js, deliveries: SelectAll::new(), problems })
    }

    async fn direct(&self, conn: &mut NatsConn, a: &str, b: &str) -> anyhow::Result<String> {
        self.ensure_stream(conn.js.as_ref()).await?;
        Ok(direct_subject(self.flavour, a, b))
    }

    async fn room(
        &self,
        conn: &mut NatsConn,
        owner: &str,
        _members: &[String],
    ) -> anyhow::Result<String> {
        self.ensure_stream(conn.js.as_ref()).await?;
        Ok(room_subject(self.flavour, owner))
    }
}

/// Sending half.
pub struct NatsTx {
    client: Client,
    js: Option<(jetstream::Context, mpsc::UnboundedSender<AckFuture>)>,
    subject: Option<(String, Subject)>,
}

impl std::fmt::Debug for NatsTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTx").field("jetstream", &self.js.is_some()).finish()
    }
}

/// Receiving half: deliveries, JetStream acks, and problems the client reported.
pub struct NatsRx {
    deliveries: SelectAll<Events>,
    problems: mpsc::UnboundedReceiver<Event>,
    acks: Option<mpsc::UnboundedReceiver<AckFuture>>,
    pending: FuturesUnordered<AckFuture>,
}

impl std::fmt::Debug for NatsRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsRx").field("pending_acks", &self.pending.len()).finish()
    }
}

impl Connection for NatsConn {
    type Tx = NatsTx;
    type Rx = NatsRx;

    async fn join(&mut self, channel: &str) -> anyhow::Result<()> {
        let events: Events = match &self.js {
            None => {
                let sub = self
                    .client
                    .subscribe(channel.to_owned())
                    .await
                    .with_context(|| format!("subscribe {channel}"))?;
                // Written out now, so the subscription is in place before the load starts.
                self.client.flush().await?;
                sub.map(|m| Event::Delivery(m.payload)).boxed()
            }
            Some(js) => {
                let stream = js
                    .get_stream_no_info(STREAM)
                    .await
                    .map_err(|e| anyhow::anyhow!("stream {STREAM}: {e}"))?;
                let consumer = stream
                    .create_consumer(OrderedConfig {
                        deliver_subject: self.client.new_inbox(),
                        filter_subject: channel.to_owned(),
                        deliver_policy: DeliverPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("consumer on {channel}: {e}"))?;
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|e| anyhow::anyhow!("consuming {channel}: {e}"))?;
                messages
                    .map(|m| match m {
                        Ok(m) => Event::Delivery(m.message.payload),
                        Err(e) => Event::Error(format!("nats-js consumer: {}", e.kind()), None),
                    })
                    .boxed()
            }
        };
        self.deliveries.push(events);
        Ok(())
    }

    fn split(self) -> (NatsTx, NatsRx) {
        let (js, acks) = match self.js {
            Some(js) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some((js, tx)), Some(rx))
            }
            None => (None, None),
        };
        (
            NatsTx { client: self.client, js, subject: None },
            NatsRx {
                deliveries: self.deliveries,
                problems: self.problems,
                acks,
                pending: FuturesUnordered::new(),
            },
        )
    }
}

impl NatsTx {
    /// The subject for `channel`, parsed once per channel rather than once per message.
    fn subject(&mut self, channel: &str) -> Subject {
        match &self.subject {
            Some((name, s)) if name == channel => s.clone(),
            _ => {
                let s = Subject::from(channel);
                self.subject = Some((channel.to_owned(), s.clone()));
                s
            }
        }
    }
}

impl Tx for NatsTx {
    async fn send(&mut self, channel: &str, id: u64, payload: Bytes) -> anyhow::Result<()> {
        let subject = self.subject(channel);
        match &self.js {
            None => self.client.publish(subject, payload).await?,
            Some((js, acks)) => {
                let ack = js.publish(subject, payload).await?;
                let fut: AckFuture = Box::pin(async move {
                    match ack.await {
                        Ok(_) => Event::Ack(id),
                        Err(e) => Event::Error(format!("nats-js publish: {}", e.kind()), Some(id)),
                    }
                });
                acks.send(fut).map_err(|_| anyhow::anyhow!("receiving half closed"))?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.client.flush().await?;
        Ok(())
    }

    async fn ping(&mut self) -> anyhow::Result<()> {
        self.client.flush().await?;
        Ok(())
    }
}

impl Rx for NatsRx {
    async fn next(&mut self) -> Option<Event> {
        loop {
            tokio::select! {
                biased;
                Some(e) = self.problems.recv() => return Some(e),
                Some(fut) = async {
                    match &mut self.acks {
                        Some(rx) => rx.recv().await,
                        None => None,
                    }
                } => self.pending.push(fut),
                Some(e) = self.pending.next(), if !self.pending.is_empty() => return Some(e),
                Some(e) = self.deliveries.next(), if !self.deliveries.is_empty() => return Some(e),
                else => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_pair_in_either_order_when_naming_direct_subject_should_be_the_same() {
        assert_eq!(
            direct_subject(Flavour::Core, "lg1-a0", "lg1-b0"),
            direct_subject(Flavour::Core, "lg1-b0", "lg1-a0")
        );
        assert_eq!(direct_subject(Flavour::Core, "lg1-a0", "lg1-b0"), "lg.d.lg1-a0.lg1-b0");
        assert_ne!(
            direct_subject(Flavour::Core, "lg1-a0", "lg1-b0"),
            direct_subject(Flavour::Core, "lg1-a1", "lg1-b1")
        );
    }

    #[test]
    fn given_flavours_when_naming_subjects_should_not_overlap() {
        assert!(direct_subject(Flavour::JetStream, "a", "b").starts_with("lgjs."));
        assert!(room_subject(Flavour::JetStream, "a").starts_with("lgjs.r."));
        assert_eq!(room_subject(Flavour::Core, "lg1-r0-m0"), "lg.r.lg1-r0-m0");
    }

    #[test]
    fn given_user_with_separators_and_wildcards_when_tokenized_should_stay_one_token() {
        assert_eq!(token("a.b*c>d e"), "a_b_c_d_e");
        assert_eq!(token(""), "_");
        assert_eq!(token("ünï"), "_n_");
        let s = direct_subject(Flavour::Core, "x.y", "z");
        assert_eq!(s.split('.').count(), 4);
    }

    /// A `nats-server` started for one test on a free loopback port, stopped when dropped.
    struct Server {
        child: std::process::Child,
        addr: SocketAddr,
        _dir: std::path::PathBuf,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self._dir);
        }
    }

    /// `$NATS_SERVER`, the one `scripts/compare-peers` installs, or `nats-server` on the PATH.
    fn binary() -> Option<std::path::PathBuf> {
        let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/peers/venv/bin/nats-server");
        std::env::var_os("NATS_SERVER")
            .map(std::path::PathBuf::from)
            .into_iter()
            .chain([installed])
            .chain(std::env::var_os("PATH").into_iter().flat_map(|p| {
                std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>()
            }))
            .find(|p| p.is_file())
    }

    fn start(jetstream: bool) -> Option<Server> {
        let Some(bin) = binary() else {
            println!("skipped: no nats-server (set NATS_SERVER or run scripts/compare-peers once)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir =
            std::env::temp_dir().join(format!("loadgen-nats-test-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let mut conf = format!("listen: 127.0.0.1:{port}\n");
        if jetstream {
            conf += &format!("jetstream {{ store_dir: \"{}\" }}\n", dir.join("js").display());
        }
        let path = dir.join("nats.conf");
        std::fs::write(&path, conf).ok()?;
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Server { child, addr, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server did not listen on {addr}");
    }

    /// `a` sends one message into a direct channel with `b`: `b` receives it and `a` gets its
    /// ack (its own copy, on core NATS).
    async fn exchange(target: &Nats) {
        use crate::target::{parse, payload};
        let mut a = target.connect("t-a", None).await.unwrap();
        let mut b = target.connect("t-b", None).await.unwrap();
        let channel = target.direct(&mut a, "t-a", "t-b").await.unwrap();
        a.join(&channel).await.unwrap();
        b.join(&channel).await.unwrap();
        let (mut a_tx, mut a_rx) = a.split();
        let (_b_tx, mut b_rx) = b.split();
        // The server applies each connection's subscriptions on its own schedule.
        tokio::time::sleep(Duration::from_millis(300)).await;
        a_tx.send(&channel, 7, payload(7, 0, 32)).await.unwrap();
        a_tx.flush().await.unwrap();
        let within = Duration::from_secs(10);
        match tokio::time::timeout(within, b_rx.next()).await.unwrap() {
            Some(Event::Delivery(p)) => assert_eq!(parse(&p), Some((7, 0))),
            other => panic!("expected the delivery, got {other:?}"),
        }
        loop {
            match tokio::time::timeout(within, a_rx.next()).await.unwrap() {
                Some(Event::Ack(7)) if target.acks() => break,
                Some(Event::Delivery(p)) if !target.acks() => {
                    assert_eq!(parse(&p), Some((7, 0)));
                    break;
                }
                Some(Event::Delivery(_)) => {}
                other => panic!("expected the ack, got {other:?}"),
            }
        }
        a_tx.ping().await.unwrap();
    }

    #[tokio::test]
    async fn given_core_server_when_member_sends_should_deliver_and_echo_to_sender() {
        let Some(server) = start(false) else { return };
        exchange(&Nats::new(server.addr, Flavour::Core)).await;
    }

    #[tokio::test]
    async fn given_jetstream_server_when_member_sends_should_store_ack_and_deliver() {
        let Some(server) = start(true) else { return };
        exchange(&Nats::new(server.addr, Flavour::JetStream)).await;
    }
}
