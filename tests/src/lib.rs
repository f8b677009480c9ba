//! # End-to-end test harness
//!
//! [`Broker`] starts a real broker process (`switchboard-test-broker`, the library's command
//! line) on `127.0.0.1:0` with its own data directory, reads the JSON ready line for the bound
//! address, and kills it on drop. At most two brokers run at once per test process, so the
//! suite stays stable on a 2-core machine. The broker's log is kept in the temp directory and
//! printed when a test panics.
//!
//! [`RawConn`] speaks the wire protocol frame by frame, for tests of exact protocol behaviour;
//! the Rust client ([`Broker::client`]) is used where a real application would use it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchboard_client::{Client, Event, EventStream, Message, ReconnectPolicy};
use switchboard_protocol::{
    ClientCodec, ClientFrame, ServerFrame, Welcome, client_frame, server_frame,
};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

/// The HS256 secret every test broker uses.
pub const SECRET: &str = "switchboard-test-secret-0123456789";

/// How long tests wait for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(20);

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();
const MAX_BROKERS: usize = 2;

struct Permit;

impl Permit {
    fn acquire() -> Self {
        let mut n = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n >= MAX_BROKERS {
            n = FREED.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n += 1;
        Self
    }

    /// Every slot at once, for a cluster (its nodes then start without permits of their own).
    fn acquire_all() -> Vec<Self> {
        let mut n = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while *n > 0 {
            n = FREED.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *n = MAX_BROKERS;
        (0..MAX_BROKERS).map(|_| Self).collect()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut n = RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *n -= 1;
        FREED.notify_all();
    }
}

/// How to start a broker.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--shards` (3 by default, so cross-shard paths run).
    pub shards: usize,
    /// `--durability` (`buffered` unless durability is under test).
    pub durability: String,
    /// More flags.
    pub args: Vec<String>,
    /// Pass `--jwt-secret SECRET` (true by default); without it the broker generates its own
    /// secret, which also enables its development-token endpoint.
    pub jwt_secret: bool,
    /// The loopback address every listener binds (127.0.0.1 by default; cluster nodes use one
    /// address each, so a partition can be cut between addresses).
    pub ip: std::net::Ipv4Addr,
    /// Gossip on `ip` (a free port, kept across restarts): `--cluster-listen`.
    pub gossip: bool,
    /// Extra environment variables (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// The data directory, when not the broker's own temporary one (e.g. on a test mount).
    pub data_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            shards: 3,
            durability: "buffered".into(),
            args: Vec::new(),
            jwt_secret: true,
            ip: std::net::Ipv4Addr::LOCALHOST,
            gossip: false,
            env: Vec::new(),
            data_dir: None,
        }
    }
}

impl Options {
    /// Default options plus extra flags.
    #[must_use]
    pub fn with_args(args: &[&str]) -> Self {
        Self { args: args.iter().map(ToString::to_string).collect(), ..Self::default() }
    }
}

/// A broker process under test.
pub struct Broker {
    child: Option<Child>,
    /// The binary protocol address.
    pub addr: SocketAddr,
    /// The HTTP address (WebSocket bridge, metrics, demo page).
    pub http: SocketAddr,
    /// The gossip address, when clustered.
    pub gossip: Option<SocketAddr>,
    dir: tempfile::TempDir,
    opts: Options,
    starts: usize,
    _permit: Option<Permit>,
}

impl Broker {
    /// Starts a broker with default options.
    #[must_use]
    pub fn start() -> Self {
        Self::start_with(Options::default())
    }

    /// Starts a broker.
    ///
    /// # Panics
    /// When the broker does not come up.
    #[must_use]
    pub fn start_with(opts: Options) -> Self {
        Self::start_permitted(opts, Some(Permit::acquire()))
    }

    fn start_permitted(opts: Options, permit: Option<Permit>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let any = SocketAddr::from((opts.ip, 0));
        let mut b = Self {
            child: None,
            addr: any,
            http: any,
            gossip: opts.gossip.then_some(any),
            dir,
            opts,
            starts: 0,
            _permit: permit,
        };
        b.spawn();
        b
    }

    /// The data directory (kept across restarts).
    #[must_use]
    pub fn data_dir(&self) -> PathBuf {
        self.opts.data_dir.clone().unwrap_or_else(|| self.dir.path().join("data"))
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("broker-{n}.log"))
    }

    /// The broker's command line (a new log file per start).
    fn command(&mut self) -> Command {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts)).expect("log file");
        let mut cmd = Command::new(broker_bin());
        cmd.arg("--listen")
            .arg(self.addr.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--shards")
            .arg(self.opts.shards.to_string())
            .arg("--durability")
            .arg(&self.opts.durability)
            .args(if self.opts.jwt_secret { vec!["--jwt-secret", SECRET] } else { Vec::new() })
            // Tests drive load no user would: lift the per-user and per-address rates (tests
            // of the limits set their own, after these).
            .args([
                "--set",
                "limits.send_rate_per_sec=1000000",
                "--set",
                "limits.send_burst=1000000",
            ])
            .args([
                "--set",
                "limits.connect_rate_per_ip=1000000",
                "--set",
                "limits.connect_burst_per_ip=1000000",
            ])
            .args(self.gossip.map(|g| format!("--cluster-listen={g}")))
            .args(&self.opts.args)
            // The test broker's failpoint routes (admin API) answer only with this.
            .env("SWITCHBOARD_TEST_FAILPOINTS", "1")
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .env(
                "SWITCHBOARD_LOG",
                std::env::var("SB_TEST_LOG")
                    .unwrap_or_else(|_| "info,lsm_tree=warn,fjall=warn,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        cmd
    }

    /// Starts the broker again and SIGKILLs it `after` that, whether or not it finished
    /// starting (recovering its store, binding its listeners): a crash during recovery.
    pub async fn start_and_kill_after(&mut self, after: Duration) {
        self.kill();
        let mut child = self.command().stdout(Stdio::null()).spawn().expect("spawn broker");
        tokio::time::sleep(after).await;
        let _ = child.kill();
        let _ = child.wait();
    }

    fn spawn(&mut self) {
        if let Err(why) = self.try_spawn() {
            panic!("{why}");
        }
    }

    /// Restarts the broker; `Err` (with its exit status) when it stops instead of becoming
    /// ready, e.g. refusing a damaged store.
    ///
    /// # Errors
    /// Why it did not start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        self.try_spawn()
    }

    fn try_spawn(&mut self) -> Result<(), String> {
        let mut child = self.command().spawn().expect("spawn broker");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the broker never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx.recv_timeout(WAIT).unwrap_or_default();
        let ready: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(format!(
                    "broker did not print a ready line ({status:?}): {line:?}\n{}",
                    self.log_tail()
                ));
            }
        };
        assert_eq!(ready["event"], "ready");
        self.addr = ready["tcp"].as_str().and_then(|s| s.parse().ok()).expect("tcp address");
        self.http = ready["http"].as_str().and_then(|s| s.parse().ok()).expect("http address");
        if self.gossip.is_some() {
            self.gossip = ready["gossip"].as_str().and_then(|s| s.parse().ok());
            assert!(self.gossip.is_some(), "clustered broker printed no gossip address: {line}");
        }
        self.child = Some(child);
        Ok(())
    }

    /// The broker's process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `within` for the process to exit by itself; its status, or `None` if it
    /// is still running (or was never started).
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Some(status);
            }
            if self.child.is_none() || tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then wait.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit status.
    ///
    /// # Panics
    /// When the broker does not exit within [`WAIT`].
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running broker");
        signal(c.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "broker ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the broker again on the same address and data directory (after `kill` or
    /// `terminate`; kills it first if it is still running).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The options the next (re)start uses.
    pub fn options_mut(&mut self) -> &mut Options {
        &mut self.opts
    }

    /// Everything the broker logged in its current run.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.starts)).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// A valid token for `user`.
    #[must_use]
    pub fn token(&self, user: &str) -> String {
        token(user, Duration::from_secs(3600))
    }

    /// A connected Rust client for `user` (reconnects quickly, for tests).
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn client(&self, user: &str) -> (Client, EventStream) {
        self.client_builder(user).connect().await.expect("client connects")
    }

    /// A client builder for `user` pointed at this broker.
    pub fn client_builder(&self, user: &str) -> switchboard_client::ClientBuilder {
        Client::builder(self.addr.to_string()).token(self.token(user)).reconnect(ReconnectPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(300),
            ..ReconnectPolicy::default()
        })
    }

    /// A raw protocol connection.
    pub async fn raw(&self) -> RawConn {
        RawConn::connect(self.addr).await
    }

    /// A raw connection that has completed the handshake as `user`.
    pub async fn raw_as(&self, user: &str) -> (RawConn, Welcome) {
        let mut c = self.raw().await;
        let w = c.hello(&self.token(user)).await;
        (c, w)
    }
}

/// A cluster of brokers on loopback, node `i` (id `i + 1`) on address `127.0.0.(i + 1)`,
/// joined through node 1's gossip address. Holds every broker slot of the test process.
pub struct Cluster {
    /// The nodes, by index.
    pub nodes: Vec<Broker>,
    _permits: Vec<Permit>,
}

impl Cluster {
    /// Starts `n` nodes with `opts` (its `ip`, `gossip` and node flags are set per node).
    #[must_use]
    pub fn start(n: u8, opts: &Options) -> Self {
        let mut cluster = Self { nodes: Vec::new(), _permits: Permit::acquire_all() };
        for _ in 0..n {
            cluster.add_node(opts);
        }
        cluster
    }

    /// Starts one more node, joined through node 1.
    ///
    /// # Panics
    /// When it does not come up.
    pub fn add_node(&mut self, opts: &Options) -> &mut Broker {
        let i = u8::try_from(self.nodes.len()).expect("at most 255 nodes");
        let mut o = opts.clone();
        o.ip = std::net::Ipv4Addr::new(127, 0, 0, i + 1);
        o.gossip = true;
        o.args.push(format!("--node-id={}", i + 1));
        if let Some(seed) = self.nodes.first().and_then(|first| first.gossip) {
            o.args.push(format!("--seeds={seed}"));
        }
        self.nodes.push(Broker::start_permitted(o, None));
        self.nodes.last_mut().expect("just added")
    }

    /// Waits until `node`'s gossip view satisfies `pred`, and returns that view.
    ///
    /// # Panics
    /// After [`WAIT`] without it.
    pub async fn wait_view(
        &self,
        node: usize,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let http = self.nodes[node].http;
        eventually(&format!("node {} to see {what}", node + 1), || async {
            let (status, body) = http_get(http, "/cluster").await;
            let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if status == 200 && pred(&view) {
                Ok(view)
            } else {
                Err(format!("last view: {view:#}"))
            }
        })
        .await
    }
}

/// Polls `probe` every 50 ms until it returns `Ok`, and returns that value.
///
/// # Panics
/// After [`WAIT`], with `what` and the last `Err` (what was seen instead).
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(seen) if tokio::time::Instant::now() >= deadline => {
                panic!("waited {WAIT:?} for {what}; {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The member with id `id` in a `/cluster` view.
#[must_use]
pub fn member(view: &serde_json::Value, id: u64) -> Option<&serde_json::Value> {
    view["members"].as_array()?.iter().find(|m| m["id"] == id)
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- broker log (last lines) ----\n{}\n----", self.log_tail());
        }
        self.kill();
    }
}

/// The broker binary: `$SB_BROKER_BIN`, or `switchboard-test-broker` next to the test
/// executable's `deps/` directory (cargo builds it for this package's integration tests).
/// The broker binary the tests run (`SB_BROKER_BIN`, or the test build next to the tests).
#[must_use]
pub fn broker_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SB_BROKER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    dir.join("switchboard-test-broker")
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY-free alternative: the `kill` command.
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// A token for `user` signed with [`SECRET`], valid for `ttl`.
#[must_use]
pub fn token(user: &str, ttl: Duration) -> String {
    switchboard_broker::auth::mint(SECRET.as_bytes(), user, ttl).expect("mint")
}

/// A raw frame-level connection.
pub struct RawConn {
    framed: Framed<TcpStream, ClientCodec>,
    next_id: u64,
    /// Pushes received while waiting for replies.
    pub pushes: Vec<ServerFrame>,
}

impl RawConn {
    /// Connects.
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::over(TcpStream::connect(addr).await.expect("connect"))
    }

    /// Connects and completes the handshake as the holder of `token`; `None` when the broker
    /// cannot be reached or does not answer (down, paused or cut off).
    pub async fn try_connect(addr: SocketAddr, token: &str) -> Option<Self> {
        let connect = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr));
        let mut c = Self::over(connect.await.ok()?.ok()?);
        let id = c.next_id();
        if !c.try_send(ClientFrame::request(id, hello(token))).await {
            return None;
        }
        let reply = tokio::time::timeout(Duration::from_secs(5), c.framed.next()).await;
        match reply {
            Ok(Some(Ok(f))) if matches!(f.kind, Some(server_frame::Kind::Welcome(_))) => Some(c),
            _ => None,
        }
    }

    /// Connects from the loopback address `local` (partition tests cut node addresses apart;
    /// the test's own connections come from an address no rule names).
    ///
    /// # Panics
    /// When the connection fails.
    pub async fn connect_from(addr: SocketAddr, local: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(local, 0)).expect("bind");
        Self::over(socket.connect(addr).await.expect("connect"))
    }

    fn over(stream: TcpStream) -> Self {
        stream.set_nodelay(true).expect("nodelay");
        Self {
            framed: Framed::new(stream, ClientCodec::new(16 << 20)),
            next_id: 1,
            pushes: Vec::new(),
        }
    }

    /// Sends a frame.
    ///
    /// # Panics
    /// When the write fails.
    pub async fn send(&mut self, frame: ClientFrame) {
        self.framed.send(frame).await.expect("send frame");
    }

    /// Sends a frame; `false` when the connection is gone.
    pub async fn try_send(&mut self, frame: ClientFrame) -> bool {
        self.framed.send(frame).await.is_ok()
    }

    /// The next frame; `None` on close, error or [`WAIT`] without a frame.
    pub async fn try_recv(&mut self) -> Option<ServerFrame> {
        match tokio::time::timeout(WAIT, self.framed.next()).await {
            Ok(Some(Ok(f))) => Some(f),
            _ => None,
        }
    }

    /// Writes raw bytes, bypassing the codec.
    pub async fn send_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(bytes).await
    }

    /// The next frame, `None` on a clean close.
    ///
    /// # Panics
    /// When nothing arrives within [`WAIT`] or the stream is broken.
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        match tokio::time::timeout(WAIT, self.framed.next()).await {
            Ok(Some(Ok(f))) => Some(f),
            Ok(Some(Err(e))) => panic!("bad frame from broker: {e}"),
            Ok(None) => None,
            Err(_) => panic!("no frame from broker within {WAIT:?}"),
        }
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends a request and returns its reply, keeping pushes that arrive meanwhile.
    ///
    /// # Panics
    /// When the connection closes first.
    pub async fn request(&mut self, kind: client_frame::Kind) -> server_frame::Kind {
        let id = self.next_id();
        self.send(ClientFrame::request(id, kind)).await;
        self.reply_to(id).await
    }

    /// Waits for the reply to request `id`.
    ///
    /// # Panics
    /// When the connection closes first.
    pub async fn reply_to(&mut self, id: u64) -> server_frame::Kind {
        loop {
            let f = self.recv().await.expect("connection closed before the reply");
            if f.request_id == id {
                return f.kind.expect("reply has a kind");
            }
            assert_eq!(f.request_id, 0, "reply to an unexpected request: {f:?}");
            self.pushes.push(f);
        }
    }

    /// Waits for the replies to all of `ids`, in whatever order they come.
    ///
    /// # Panics
    /// When the connection closes first or an unexpected reply arrives.
    pub async fn replies(
        &mut self,
        ids: &[u64],
    ) -> std::collections::HashMap<u64, server_frame::Kind> {
        let mut want: std::collections::HashSet<u64> = ids.iter().copied().collect();
        let mut got = std::collections::HashMap::new();
        while !want.is_empty() {
            let f = self.recv().await.expect("connection closed before the replies");
            if want.remove(&f.request_id) {
                got.insert(f.request_id, f.kind.expect("reply has a kind"));
            } else {
                assert_eq!(f.request_id, 0, "reply to an unexpected request: {f:?}");
                self.pushes.push(f);
            }
        }
        got
    }

    /// Creates (or gets) the direct conversation with `other`; returns its id.
    ///
    /// # Panics
    /// When the broker refuses.
    pub async fn create_direct(&mut self, other: &str) -> String {
        let req =
            client_frame::Kind::CreateConversation(switchboard_protocol::CreateConversation {
                kind: switchboard_protocol::ConversationKind::Direct as i32,
                members: vec![other.into()],
                ..Default::default()
            });
        match self.request(req).await {
            server_frame::Kind::Conversation(c) => c.conversation_id,
            other => panic!("expected Conversation, got {other:?}"),
        }
    }

    /// A conversation's whole log, as (seq, client_msg_id), paged through `History`.
    ///
    /// # Panics
    /// When the broker answers with anything else.
    pub async fn log(&mut self, conv: &str) -> Vec<(u64, String)> {
        let mut log = Vec::new();
        let mut after = 0;
        loop {
            let page = match self
                .request(client_frame::Kind::History(switchboard_protocol::History {
                    conversation_id: conv.into(),
                    limit: 200,
                    anchor: Some(switchboard_protocol::history::Anchor::AfterSeq(after)),
                }))
                .await
            {
                server_frame::Kind::History(p) => p,
                other => panic!("expected History, got {other:?}"),
            };
            log.extend(page.messages.iter().map(|m| (m.seq, m.client_msg_id.clone())));
            match page.messages.last() {
                Some(m) if page.has_more => after = m.seq,
                _ => return log,
            }
        }
    }

    /// One `Sync` page from `position`, continuing `continuation`.
    ///
    /// # Panics
    /// When the broker answers with anything else.
    pub async fn sync(
        &mut self,
        position: switchboard_protocol::SyncPosition,
        continuation: bytes::Bytes,
    ) -> switchboard_protocol::SyncPage {
        let req = client_frame::Kind::Sync(switchboard_protocol::Sync {
            position: Some(position),
            limit: 0,
            continuation,
        });
        match self.request(req).await {
            server_frame::Kind::Sync(p) => p,
            other => panic!("expected SyncPage, got {other:?}"),
        }
    }

    /// Sends `Hello` and returns the `Welcome`.
    ///
    /// # Panics
    /// When the handshake fails.
    pub async fn hello(&mut self, token: &str) -> Welcome {
        match self.request(hello(token)).await {
            server_frame::Kind::Welcome(w) => w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Reads until the broker closes; returns every frame received.
    pub async fn until_closed(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.framed.next()).await {
                Ok(Some(Ok(f))) => frames.push(f),
                Ok(Some(Err(_)) | None) => return frames,
                Err(_) => panic!("broker did not close within {WAIT:?}; got {frames:?}"),
            }
        }
    }

    /// The next pushed `Message`, from the buffer or the wire.
    ///
    /// # Panics
    /// When the connection closes first.
    pub async fn next_message(&mut self) -> Message {
        loop {
            let f = if self.pushes.is_empty() {
                self.recv().await.expect("connection closed")
            } else {
                self.pushes.remove(0)
            };
            if let Some(server_frame::Kind::Message(m)) = f.kind {
                return m;
            }
        }
    }
}

/// A `Hello` for `token`.
#[must_use]
pub fn hello(token: &str) -> client_frame::Kind {
    client_frame::Kind::Hello(switchboard_protocol::Hello {
        protocol_version: switchboard_protocol::PROTOCOL_VERSION,
        token: token.into(),
        resume: None,
        client: "switchboard-tests".into(),
    })
}

/// Collects `Message` events of `conversation` until `n` have arrived.
///
/// # Panics
/// When they do not arrive within [`WAIT`].
pub async fn messages(events: &mut EventStream, conversation: &str, n: usize) -> Vec<Message> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Event::Message(m))) if m.conversation_id == conversation => out.push(m),
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended after {} of {n} messages", out.len()),
            Err(_) => panic!("only {} of {n} messages arrived in {conversation}", out.len()),
        }
    }
    out
}

/// Asserts that `seqs` are `first, first+1, …` without gaps or repeats.
///
/// # Panics
/// On a gap or a repeat.
pub fn assert_gapless(seqs: impl IntoIterator<Item = u64>, first: u64) {
    for (i, s) in seqs.into_iter().enumerate() {
        assert_eq!(s, first + i as u64, "entry {i}: expected seq {}, got {s}", first + i as u64);
    }
}

/// The text of a message, if it has text content.
#[must_use]
pub fn text(m: &Message) -> Option<&str> {
    m.content.as_ref().and_then(|c| c.as_text())
}

/// Reads a whole file, for assertions about data files.
#[must_use]
pub fn read_all(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut v);
    }
    v
}

/// One request received by a [`WebhookReceiver`].
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names (lower case) and values.
    pub headers: std::collections::HashMap<String, String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// The body as JSON.
    ///
    /// # Panics
    /// When it is not JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A local HTTP endpoint for push-webhook tests: records every POST and answers with the
/// status currently set (200 by default).
pub struct WebhookReceiver {
    /// `http://127.0.0.1:<port>/hook`
    pub url: String,
    received: tokio::sync::mpsc::UnboundedReceiver<Received>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

impl WebhookReceiver {
    /// Starts listening on a free loopback port.
    ///
    /// # Panics
    /// When it cannot bind.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let st = status.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, st) = (tx.clone(), st.clone());
                tokio::spawn(async move {
                    let _ = serve_http(stream, tx, st).await;
                });
            }
        });
        Self { url, received, status }
    }

    /// Makes later requests fail (e.g. 503) or succeed (200).
    pub fn respond_with(&self, status: u16) {
        self.status.store(status, std::sync::atomic::Ordering::SeqCst);
    }

    /// The next request, if one arrives within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        tokio::time::timeout(within, self.received.recv()).await.ok().flatten()
    }
}

/// Minimal HTTP/1.1 server loop for the tests: `Content-Length` bodies, keep-alive.
async fn serve_http(
    stream: TcpStream,
    tx: tokio::sync::mpsc::UnboundedSender<Received>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::io::BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut headers = std::collections::HashMap::new();
        loop {
            let mut h = String::new();
            stream.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; len];
        stream.read_exact(&mut body).await?;
        let code = status.load(std::sync::atomic::Ordering::SeqCst);
        let _ = tx.send(Received { headers, body });
        let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
        stream.get_mut().write_all(reply.as_bytes()).await?;
    }
}

/// The WebSocket subprotocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsProto {
    /// `switchboard.v1.proto`
    Binary,
    /// `switchboard.v1.json`
    Json,
}

impl WsProto {
    /// The registered name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Binary => "switchboard.v1.proto",
            Self::Json => "switchboard.v1.json",
        }
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket connection to the bridge, frame by frame.
pub struct WsConn {
    ws: WsStream,
    proto: WsProto,
    next_id: u64,
    /// Pushes received while waiting for replies.
    pub pushes: Vec<ServerFrame>,
}

impl WsConn {
    /// Opens `/ws` with one subprotocol (and optionally an `Origin`).
    ///
    /// # Errors
    /// The handshake failure (e.g. an HTTP 403 for a refused origin).
    pub async fn connect(
        http: SocketAddr,
        proto: WsProto,
        origin: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{http}/ws").into_client_request()?;
        req.headers_mut().insert("Sec-WebSocket-Protocol", proto.name().parse().expect("header"));
        if let Some(o) = origin {
            req.headers_mut().insert("Origin", o.parse().expect("header"));
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        assert_eq!(
            resp.headers().get("Sec-WebSocket-Protocol").and_then(|v| v.to_str().ok()),
            Some(proto.name())
        );
        Ok(Self { ws, proto, next_id: 1, pushes: Vec::new() })
    }

    /// Sends a frame in the connection's encoding.
    ///
    /// # Panics
    /// When the write fails.
    pub async fn send(&mut self, frame: &ClientFrame) {
        use prost::Message as _;
        use tokio_tungstenite::tungstenite::Message;
        let msg = match self.proto {
            WsProto::Binary => Message::Binary(frame.encode_to_vec().into()),
            WsProto::Json => {
                Message::Text(switchboard_protocol::json::encode(frame).expect("JSON form").into())
            }
        };
        self.ws.send(msg).await.expect("ws send");
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: tokio_tungstenite::tungstenite::Message) {
        let _ = self.ws.send(msg).await;
    }

    /// The next server frame; `None` once the broker closed the connection.
    ///
    /// # Panics
    /// When nothing arrives within [`WAIT`] or a message is not a valid frame.
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        use prost::Message as _;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame in time");
            match next {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(self.proto, WsProto::Binary, "binary message on a JSON connection");
                    return Some(ServerFrame::decode(b).expect("protobuf frame"));
                }
                Some(Ok(Message::Text(t))) => {
                    assert_eq!(self.proto, WsProto::Json, "text message on a binary connection");
                    return Some(
                        switchboard_protocol::json::decode_server(t.as_str()).expect("JSON frame"),
                    );
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return None,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads until the broker closes; returns every frame received.
    pub async fn until_closed(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }

    /// Sends a request and returns its reply, keeping pushes.
    ///
    /// # Panics
    /// When the connection closes first.
    pub async fn request(&mut self, kind: client_frame::Kind) -> server_frame::Kind {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&ClientFrame::request(id, kind)).await;
        loop {
            let f = self.recv().await.expect("connection closed before the reply");
            if f.request_id == id {
                return f.kind.expect("reply has a kind");
            }
            self.pushes.push(f);
        }
    }

    /// The next pushed `Message`.
    ///
    /// # Panics
    /// When the connection closes first.
    pub async fn next_message(&mut self) -> Message {
        loop {
            let f = if self.pushes.is_empty() {
                self.recv().await.expect("connection closed")
            } else {
                self.pushes.remove(0)
            };
            if let Some(server_frame::Kind::Message(m)) = f.kind {
                return m;
            }
        }
    }
}

/// `GET http://<addr><path>`: (status, body).
///
/// # Panics
/// When the request cannot be made.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "").await
}

/// A minimal HTTP/1.1 request for tests: (status, body).
///
/// # Panics
/// When the request cannot be made.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[], body).await
}

/// [`http_request`] with extra headers (`("Authorization", "Bearer …")`).
///
/// # Panics
/// When the request cannot be made.
pub async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::fmt::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let extra = headers.iter().fold(String::new(), |mut h, (k, v)| {
        let _ = write!(h, "{k}: {v}\r\n");
        h
    });
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}
