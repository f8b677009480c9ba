//! Shards: one OS thread each, running a `current_thread` tokio runtime with a `LocalSet`.
//!
//! A shard plays three roles at once:
//! - **partition owner** ([`owner`]) for the conversations whose partition maps to it:
//!   sequencing, membership, dedupe, authorization and fan-out routing;
//! - **home shard** ([`home`]) for the users hashed to it: where their sessions are;
//! - **host** ([`local`]) of the connections its listener accepted: their outbound queues and
//!   which of them are interested in which conversation.
//!
//! Shard-local state lives in `RefCell`s (one thread, no locks). Shards talk only through
//! bounded typed mailboxes ([`mailbox`]); the mailbox loop never awaits another shard: a full
//! mailbox spills into a per-target overflow queue drained by a forwarder task, which keeps the
//! order of messages from one shard to another.
//!
//! ## Mailbox protocol
//! - session shard → owner: `Request` (send, create, membership ops), `Subscribe`,
//!   `Unsubscribe`, in FIFO order per pair of shards;
//! - owner → session shard: one `Local` bundle per commit (replies, acks, deliveries,
//!   revocations, in log order), so a client never sees message N+1 before the ack of N;
//! - session shard → home shard: `SessionUp` (acknowledged) / `SessionDown`;
//! - owner → home shard → session shards: membership feed events (`UserEvent`);
//! - storage writer → owner: `Committed`, in submission order.
//! - (cluster) storage writer or replication engine → owner: `Replicated`, a partition's
//!   share of a batch applied after its majority commit, or failed.
//! - (cluster) storage writer → owner: `Replayed`, committed entries another leader proposed,
//!   for local deliveries; peer server → owner: `Forwarded`, another node's request.

mod forward;
pub(crate) use forward::{ReadAt, complete};
pub mod home;
pub mod interest;
pub mod local;
pub mod mailbox;
pub mod outbound;
pub mod owner;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::push::Webhook;
use crate::ratelimit::Limiters;
use crate::storage::{Storage, WriteBatch, WriterHandle};

pub use mailbox::{HomeMsg, LocalMsg, OwnerMsg, OwnerOp, ShardMsg};

/// Period of the shard's housekeeping tick.
pub const TICK: Duration = Duration::from_millis(100);

/// Number of partitions; fixed forever (part of the on-disk key layout).
pub const PARTITIONS: u64 = 1024;
/// Most shards a broker runs (interest sets are 64-bit masks).
pub const MAX_SHARDS: usize = 64;
/// Capacity of each shard's mailbox, in messages.
pub const MAILBOX_CAPACITY: usize = 16 * 1024;

/// The partition of a conversation.
#[must_use]
pub fn partition(conversation: &str) -> u16 {
    #[allow(clippy::cast_possible_truncation)]
    let p = (xxh3_64(conversation.as_bytes()) % PARTITIONS) as u16;
    p
}

/// The shard owning a partition.
#[must_use]
pub fn owner_shard(partition: u16, shards: usize) -> usize {
    usize::from(partition) % shards
}

/// The home shard of a user.
#[must_use]
pub fn home_shard(user: &str, shards: usize) -> usize {
    #[allow(clippy::cast_possible_truncation)]
    let s = (xxh3_64(user.as_bytes()) % shards as u64) as usize;
    s
}

/// Groups users by their home shard.
#[must_use]
pub fn group_by_home(
    users: impl IntoIterator<Item = Arc<str>>,
    shards: usize,
) -> HashMap<usize, Vec<Arc<str>>> {
    let mut by: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
    for u in users {
        by.entry(home_shard(&u, shards)).or_default().push(u);
    }
    by
}

/// How long a client should wait before retrying after `UNAVAILABLE`.
pub const UNAVAILABLE_RETRY_MS: u64 = 1_000;
/// How long a client should wait before retrying after `STORAGE_FULL`.
pub const STORAGE_FULL_RETRY_MS: u64 = 5_000;

/// An error reply, with the retry hint the broker gives for its code.
#[must_use]
pub fn error_frame(
    request_id: u64,
    code: switchboard_protocol::ErrorCode,
    message: impl Into<String>,
) -> switchboard_protocol::ServerFrame {
    use switchboard_protocol::{ErrorCode, server_frame::Kind};
    let mut frame = switchboard_protocol::ServerFrame::error(request_id, code, message);
    let retry = match code {
        ErrorCode::Unavailable => UNAVAILABLE_RETRY_MS,
        ErrorCode::StorageFull => STORAGE_FULL_RETRY_MS,
        _ => 0,
    };
    if retry > 0
        && let Some(Kind::Error(e)) = frame.kind.as_mut()
    {
        e.retry_after_ms = retry;
    }
    frame
}

/// A `RATE_LIMITED` error reply telling the client how long to wait.
#[must_use]
pub fn rate_limited_frame(
    request_id: u64,
    what: &'static str,
    wait: std::time::Duration,
) -> switchboard_protocol::ServerFrame {
    use switchboard_protocol::{ErrorCode, server_frame::Kind};
    metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => what).increment(1);
    let retry = crate::ratelimit::retry_after_ms(wait);
    let mut frame = switchboard_protocol::ServerFrame::error(
        request_id,
        ErrorCode::RateLimited,
        format!("{what} rate limit exceeded; retry after {retry} ms"),
    );
    if let Some(Kind::Error(e)) = frame.kind.as_mut() {
        e.retry_after_ms = retry;
    }
    frame
}

/// A session anywhere in the broker: its shard and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionRef {
    /// The shard hosting the connection.
    pub shard: usize,
    /// Unique within that shard.
    pub id: u64,
}

/// Everything a shard thread needs, built by the runtime.
pub struct ShardSetup {
    /// This shard's index.
    pub id: usize,
    /// Configuration.
    pub config: Arc<Config>,
    /// Storage (reads) and the writer (writes).
    pub storage: Arc<Storage>,
    /// The storage writer.
    pub writer: WriterHandle,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Every shard's mailbox sender, indexed by shard.
    pub mailboxes: Vec<mpsc::Sender<ShardMsg>>,
    /// Rate limiters, shared by all shards.
    pub limiters: Arc<Limiters>,
    /// The push webhook, when configured.
    pub webhook: Option<Webhook>,
    /// The metrics recorder's handle, for `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Mints the tokens of `POST /dev/token`, when development tokens are on.
    pub dev_minter: Option<crate::auth::Minter>,
    /// The cluster as gossip sees it, when clustering is on.
    pub cluster: Option<ClusterView>,
}

/// The latest cluster state: gossip's view and the control plane's.
#[derive(Debug, Clone)]
pub struct ClusterView {
    /// Membership, published by the gossip thread.
    pub gossip: tokio::sync::watch::Receiver<Arc<crate::cluster::membership::View>>,
    /// Raft leader and the partition table, published by the control thread.
    pub control: tokio::sync::watch::Receiver<Arc<crate::cluster::control::ControlView>>,
    /// The replication engine's summary.
    pub replication: tokio::sync::watch::Receiver<crate::cluster::replication::ReplicationView>,
    /// Where owners learn which partitions they serve and hand over their writes.
    pub routing: Routing,
}

/// The owners' link to the replication engine (cluster mode).
#[derive(Debug, Clone)]
pub struct Routing {
    /// Which partitions this node serves, and their leaders.
    pub partitions: Arc<crate::cluster::dataplane::Partitions>,
    /// Where replicated batch shares go.
    pub proposer: crate::cluster::dataplane::Proposer,
    /// The node's cluster address: forwarded requests leave from it.
    pub bind: std::net::IpAddr,
}

/// A shard: its roles' state and its links to the others. Lives on its own thread.
pub struct Shard {
    /// This shard's index.
    pub id: usize,
    /// Number of shards.
    pub count: usize,
    /// Configuration.
    pub config: Arc<Config>,
    /// Storage.
    pub storage: Arc<Storage>,
    /// Token verification.
    pub auth: Arc<Authenticator>,
    /// Rate limiters, shared by all shards.
    pub limiters: Arc<Limiters>,
    /// The metrics recorder's handle, for `/metrics`.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Mints the tokens of `POST /dev/token`, when development tokens are on.
    pub dev_minter: Option<crate::auth::Minter>,
    /// The cluster as gossip sees it, when clustering is on.
    pub cluster: Option<ClusterView>,
    /// This shard's counters.
    pub stats: crate::metrics::ShardStats,
    webhook: Option<Webhook>,
    writer: WriterHandle,
    peers: Vec<mailbox::Peer>,
    commit_sink: crate::storage::CommitSink,
    pub(crate) owner: RefCell<owner::Owner>,
    pub(crate) home: RefCell<home::Home>,
    /// Hosted sessions. Public only for the benchmarks; the shard's own code is the only user.
    #[doc(hidden)]
    pub local: RefCell<local::Local>,
    flush_scheduled: Cell<bool>,
    next_session: Cell<u64>,
    /// Queues of requests forwarded to other nodes, by node (cluster).
    forwards: RefCell<HashMap<crate::cluster::NodeId, mpsc::Sender<mailbox::Forward>>>,
    /// Queues of pushes for other nodes' sessions, by node (cluster).
    pushes: RefCell<HashMap<crate::cluster::NodeId, mpsc::Sender<forward::Push>>>,
    /// Nodes a refresh of followed conversations is in flight to (`interest`).
    refreshing: RefCell<std::collections::HashSet<crate::cluster::NodeId>>,
    /// Queues of presence reports and changes for other nodes, by node (cluster).
    presence: RefCell<HashMap<crate::cluster::NodeId, mpsc::Sender<crate::cluster::presence::Out>>>,
    /// The HTTP client for peers, built on first use (cluster).
    peer_client: std::cell::OnceCell<reqwest::Client>,
    shutdown: RefCell<Option<Shutdown>>,
    /// Cancelled when the shard shuts down; every connection holds a child token.
    pub cancel: CancellationToken,
}

struct Shutdown {
    done: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    /// Builds a shard; call on its own thread.
    #[must_use]
    pub fn new(setup: ShardSetup) -> Rc<Self> {
        let count = setup.mailboxes.len();
        let own = setup.mailboxes.get(setup.id).cloned();
        let commit_sink: crate::storage::CommitSink = Arc::new(move |c| {
            if let Some(tx) = &own {
                // Runs on the writer thread; blocking only delays the next commit round.
                let _ = tx.blocking_send(ShardMsg::Committed(c));
            }
        });
        let routing = setup.cluster.as_ref().map(|c| owner::Routed {
            partitions: c.routing.partitions.clone(),
            gossip: c.gossip.clone(),
            control: Some(c.control.clone()),
        });
        let owner =
            owner::Owner::new(setup.id, count, setup.storage.clone(), &setup.config, routing);
        let mut home = home::Home::new(&setup.config, setup.storage.clone(), count);
        home.restore_pushes(setup.id);
        if let Some(c) = &setup.cluster {
            let view = c.gossip.borrow();
            home.enable_cluster(setup.id, view.self_id, view.generation);
        }
        Rc::new(Self {
            id: setup.id,
            count,
            peers: setup.mailboxes.into_iter().map(mailbox::Peer::new).collect(),
            config: setup.config,
            storage: setup.storage,
            auth: setup.auth,
            limiters: setup.limiters,
            metrics: setup.metrics,
            dev_minter: setup.dev_minter,
            cluster: setup.cluster,
            stats: crate::metrics::ShardStats::default(),
            webhook: setup.webhook,
            writer: setup.writer,
            commit_sink,
            owner: RefCell::new(owner),
            home: RefCell::new(home),
            local: RefCell::new(local::Local::default()),
            flush_scheduled: Cell::new(false),
            next_session: Cell::new(1),
            forwards: RefCell::new(HashMap::new()),
            pushes: RefCell::new(HashMap::new()),
            refreshing: RefCell::new(std::collections::HashSet::new()),
            presence: RefCell::new(HashMap::new()),
            peer_client: std::cell::OnceCell::new(),
            shutdown: RefCell::new(None),
            cancel: CancellationToken::new(),
        })
    }

    /// Runs the mailbox loop until `Exit`. Drains up to 256 messages per wake-up, then flushes
    /// the open write batch.
    pub async fn run(self: Rc<Self>, mut rx: mpsc::Receiver<ShardMsg>) {
        while let Some(msg) = rx.recv().await {
            if !self.handle(msg) {
                break;
            }
            for _ in 0..256 {
                match rx.try_recv() {
                    Ok(msg) => {
                        if !self.handle(msg) {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            self.flush();
            self.check_drained();
        }
    }

    /// Handles one mailbox message; `false` means exit.
    fn handle(self: &Rc<Self>, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Owner(m) => self.handle_owner(m),
            ShardMsg::Home(m) => self.handle_home(m),
            ShardMsg::Local(bundle) => self.apply_local(bundle),
            ShardMsg::Committed(c) => {
                let mut out = mailbox::Outgoing::new(self.count);
                self.owner.borrow_mut().on_committed(c, &mut out);
                self.dispatch(out);
            }
            ShardMsg::Forwarded { request, reply } => {
                // A request another node forwarded: answered like a local session's, through a
                // one-shot stand-in for the session.
                let mailbox::Forward { user, request_id, op, .. } = request;
                let op = match op {
                    mailbox::Remote::Owner(op) => op,
                    mailbox::Remote::Read(op) => {
                        self.serve_forwarded_read(user, request_id, op, reply);
                        return true;
                    }
                };
                let id = self.next_session_id();
                self.local.borrow_mut().insert_remote(id, reply);
                self.handle_owner(OwnerMsg::Request {
                    from: SessionRef { shard: self.id, id },
                    user,
                    request_id,
                    op,
                    forwarded: true,
                });
            }
            ShardMsg::Replayed(replayed) => {
                let mut out = mailbox::Outgoing::new(self.count);
                self.owner.borrow_mut().on_replayed(*replayed, &mut out);
                self.dispatch(out);
            }
            ShardMsg::Replicated { token, outcome } => {
                let mut out = mailbox::Outgoing::new(self.count);
                self.owner.borrow_mut().on_replicated(token, outcome, &mut out);
                self.dispatch(out);
            }
            ShardMsg::Admin(msg) => crate::net::admin::on_shard(self, msg),
            ShardMsg::Shutdown(done) => self.begin_shutdown(done),
            ShardMsg::FinalFlush(done) => {
                let ops = self.home.borrow_mut().flush_writes();
                let mut owner = self.owner.borrow_mut();
                owner.flush_all_receipts();
                owner.append_ops(ops);
                drop(owner);
                if let Some(sd) = self.shutdown.borrow_mut().as_mut() {
                    sd.done = Some(done);
                }
                self.flush();
                self.check_drained();
            }
            ShardMsg::Exit => return false,
        }
        true
    }

    /// A new session id on this shard.
    pub fn next_session_id(&self) -> u64 {
        let id = self.next_session.get();
        self.next_session.set(id + 1);
        id
    }

    /// Whether a shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.borrow().is_some()
    }

    /// Sends an owner message to the partition owner of `conversation` (handled in place when
    /// that is this shard).
    pub fn to_owner(self: &Rc<Self>, conversation: &str, msg: OwnerMsg) {
        let target = owner_shard(partition(conversation), self.count);
        self.send_owner_at(target, msg);
    }

    /// Sends an owner message to shard `target` (handled in place when that is this shard).
    pub(crate) fn send_owner_at(self: &Rc<Self>, target: usize, msg: OwnerMsg) {
        if target == self.id {
            self.handle_owner(msg);
        } else {
            self.send(target, ShardMsg::Owner(msg));
        }
    }

    /// Sends a message to the home shard of `user` (handled in place when that is this shard).
    pub fn to_home(self: &Rc<Self>, user: &str, msg: HomeMsg) {
        self.send_home_at(home_shard(user, self.count), msg);
    }

    /// Sends a message to home shard `target` (handled in place when that is this shard).
    pub(crate) fn send_home_at(self: &Rc<Self>, target: usize, msg: HomeMsg) {
        if target == self.id {
            self.handle_home(msg);
        } else {
            self.send(target, ShardMsg::Home(msg));
        }
    }

    /// Sends a message to shard `target`'s mailbox (this shard's own too: it is then handled
    /// by the mailbox loop, not in place).
    pub(crate) fn send(&self, target: usize, msg: ShardMsg) {
        if let Some(peer) = self.peers.get(target) {
            peer.send(msg);
        }
    }

    /// Messages waiting in this shard's mailbox.
    pub(crate) fn mailbox_depth(&self) -> usize {
        self.peers.get(self.id).map_or(0, mailbox::Peer::depth)
    }

    pub(crate) fn handle_owner(self: &Rc<Self>, msg: OwnerMsg) {
        let mut out = mailbox::Outgoing::new(self.count);
        self.owner.borrow_mut().handle(msg, &mut out);
        self.dispatch(out);
    }

    fn handle_home(self: &Rc<Self>, msg: HomeMsg) {
        let mut out = mailbox::Outgoing::new(self.count);
        self.home.borrow_mut().handle(msg, &mut out);
        self.dispatch(out);
    }

    /// Routes what a role produced: bundles to session shards, events to home shards.
    pub(crate) fn dispatch(self: &Rc<Self>, out: mailbox::Outgoing) {
        let mailbox::Outgoing {
            local,
            home,
            home_at,
            owner,
            flush,
            stored,
            forward,
            peers,
            presence,
            nodes,
            refresh,
            follow,
        } = out;
        if stored > 0 {
            self.stats.messages_stored.set(self.stats.messages_stored.get() + stored);
        }
        for (shard, bundle) in local.into_iter().enumerate() {
            if bundle.is_empty() {
                continue;
            }
            if shard == self.id {
                self.apply_local(bundle);
            } else {
                self.send(shard, ShardMsg::Local(bundle));
            }
        }
        for (user, msg) in home {
            self.to_home(&user, msg);
        }
        for (shard, msg) in home_at {
            self.send_home_at(shard, msg);
        }
        for (shard, msg) in owner {
            self.send_owner_at(shard, msg);
        }
        for (node, request) in forward {
            self.forward(node, request);
        }
        for (conversation, frame, droppable) in peers {
            self.push_to_peers(&conversation, &frame, droppable);
        }
        for (node, item) in presence {
            self.presence_to(node, item);
        }
        for (to, conversation, frame, droppable) in nodes {
            self.push_to_nodes(to, &conversation, &frame, droppable);
        }
        if !refresh.is_empty() {
            self.refresh_followed(refresh);
        }
        if !follow.is_empty() {
            self.follow_elsewhere(follow);
        }
        if flush {
            self.schedule_flush();
        }
    }

    fn apply_local(self: &Rc<Self>, bundle: Vec<LocalMsg>) {
        for msg in bundle {
            local::apply(self, msg);
        }
        self.check_drained();
    }

    /// Flushes the open write batch soon: after the tasks that are ready now have run, so
    /// the requests they carry join the same batch.
    pub fn schedule_flush(self: &Rc<Self>) {
        if self.flush_scheduled.replace(true) {
            return;
        }
        let shard = self.clone();
        tokio::task::spawn_local(async move {
            tokio::task::yield_now().await;
            shard.flush();
        });
    }

    /// Hands the open batches to the storage writer, or (a cluster's conversation writes) to
    /// the replication engine.
    pub fn flush(self: &Rc<Self>) {
        self.flush_scheduled.set(false);
        let batches = self.owner.borrow_mut().take_batches();
        for batch in batches {
            match batch {
                owner::Flush::Local { token, ops } => {
                    let batch =
                        WriteBatch { token, ops, sink: self.commit_sink.clone(), fsync: true };
                    if let Err(batch) = self.writer.submit(batch) {
                        let mut out = mailbox::Outgoing::new(self.count);
                        self.owner.borrow_mut().on_committed(
                            crate::storage::Committed {
                                token: batch.token,
                                commit_no: 0,
                                result: Err(crate::storage::StorageError::Poisoned),
                            },
                            &mut out,
                        );
                        self.dispatch(out);
                    }
                }
                owner::Flush::Replicate { token, partition, epoch, ops } => {
                    let proposal = crate::cluster::dataplane::Proposal {
                        partition,
                        epoch,
                        payload: bytes::Bytes::from(crate::storage::encode_ops(&ops)),
                        ops,
                        shard: self.id,
                        token,
                    };
                    let proposed = self
                        .cluster
                        .as_ref()
                        .map(|c| c.routing.proposer.propose(proposal).map_err(|_| ()));
                    if !matches!(proposed, Some(Ok(()))) {
                        let mut out = mailbox::Outgoing::new(self.count);
                        self.owner.borrow_mut().on_replicated(
                            token,
                            crate::cluster::dataplane::Outcome::Failed,
                            &mut out,
                        );
                        self.dispatch(out);
                    }
                }
            }
        }
    }

    fn begin_shutdown(self: &Rc<Self>, done: oneshot::Sender<()>) {
        *self.shutdown.borrow_mut() = Some(Shutdown { done: Some(done) });
        local::disconnect_all(self);
        let ops = self.home.borrow_mut().shutdown_writes();
        let mut owner = self.owner.borrow_mut();
        owner.flush_all_receipts();
        owner.append_ops(ops);
        drop(owner);
        self.flush();
        self.check_drained();
    }

    /// Periodic work, every [`TICK`]: presence grace periods and leases, push windows, receipt
    /// coalescing; and, every `presence.last_seen_flush_ms`, batched writes. Also renews the
    /// presence leases of users with sessions here, every heartbeat interval; in a cluster,
    /// takes in changes of the live nodes and sends presence snapshots every heartbeat
    /// interval (`cluster::presence`).
    pub async fn run_ticks(self: Rc<Self>) {
        let flush_every = Duration::from_millis(self.config.presence.last_seen_flush_ms);
        let renew_every = Duration::from_millis(self.config.server.heartbeat_interval_ms);
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_flush = tokio::time::Instant::now();
        let mut last_renew = tokio::time::Instant::now();
        // The gossip view last taken in (none yet: the first tick takes in the current one).
        let mut view: Option<Arc<crate::cluster::membership::View>> = None;
        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return,
                _ = interval.tick() => {}
            }
            let now = tokio::time::Instant::now();
            let flush = now.duration_since(last_flush) >= flush_every;
            if flush {
                last_flush = now;
            }
            let mut out = mailbox::Outgoing::new(self.count);
            if let Some(c) = &self.cluster {
                let latest = c.gossip.borrow().clone();
                if view.as_ref().is_none_or(|seen| !Arc::ptr_eq(&latest, seen)) {
                    let live = crate::cluster::presence::Live::of(&latest);
                    view = Some(latest);
                    self.home.borrow_mut().set_live(live, &mut out);
                }
            }
            let ops = self.home.borrow_mut().tick(now.into_std(), flush, &mut out);
            self.owner.borrow_mut().tick(now.into_std(), &mut out);
            if !ops.is_empty() {
                self.owner.borrow_mut().append_ops(ops);
                out.flush = true;
            }
            self.dispatch(out);
            if now.duration_since(last_renew) >= renew_every {
                last_renew = now;
                let users = self.local.borrow().users();
                for (home, users) in group_by_home(users, self.count) {
                    self.send_home_at(home, HomeMsg::Renew { users });
                }
                let mut out = mailbox::Outgoing::new(self.count);
                let mut home = self.home.borrow_mut();
                home.snapshot(&mut out);
                home.sync(&mut out);
                drop(home);
                self.dispatch(out);
            }
            self.deliver_pushes(now.into_std());
            if flush {
                self.stats.export();
                #[allow(clippy::cast_precision_loss)]
                metrics::gauge!(crate::metrics::MAILBOX_DEPTH, "shard" => self.id.to_string())
                    .set(self.mailbox_depth() as f64);
            }
        }
    }

    /// Starts delivery of the push notifications that are due.
    fn deliver_pushes(self: &Rc<Self>, now: std::time::Instant) {
        let Some(webhook) = self.webhook.clone() else { return };
        for mut job in self.home.borrow_mut().take_ready(now) {
            let shard = self.clone();
            let webhook = webhook.clone();
            tokio::task::spawn_local(async move {
                job.notification.sent_at_ms = owner::now_ms();
                let result = webhook.deliver(&job.notification).await;
                let outcome = if result.is_ok() { "delivered" } else { "failed" };
                metrics::counter!(crate::metrics::PUSH_WEBHOOK, "outcome" => outcome).increment(1);
                if let Err(e) = &result {
                    tracing::warn!(user = %job.user, error = %e, attempt = job.attempts + 1, "push delivery failed");
                }
                shard.home.borrow_mut().push_done(job, result.is_ok());
            });
        }
    }

    /// Once shutting down: reports drained when no write is in flight and no session is left.
    pub(crate) fn check_drained(&self) {
        let mut guard = self.shutdown.borrow_mut();
        let Some(sd) = guard.as_mut() else { return };
        if self.owner.borrow().is_idle()
            && self.local.borrow().is_empty()
            && let Some(done) = sd.done.take()
        {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_conversation_partition_should_be_stable_and_in_range() {
        let p = partition("dm:alice:bob");
        assert_eq!(p, partition("dm:alice:bob"));
        assert!(u64::from(p) < PARTITIONS);
        assert!(owner_shard(p, 3) < 3);
        assert!(home_shard("alice", 3) < 3);
    }

    #[test]
    fn given_many_conversations_partitions_should_spread() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..10_000 {
            seen.insert(partition(&format!("g:{i}")));
        }
        assert!(seen.len() > 1000, "{}", seen.len());
    }
}
