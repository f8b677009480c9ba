//! The home-shard role, for the users hashed to this shard (`xxh3(user) mod shards`):
//!
//! - **sessions**: where each user's sessions are, so membership events reach every device;
//! - **presence**: one record per user (online, devices, last seen) in a moka cache. An online
//!   record lives for a lease (2 × the presence TTL) that the shards hosting the user's sessions
//!   renew every heartbeat interval in one batched message; a record whose lease lapses (a host
//!   that stopped renewing) turns offline: the safety net. Only session up/down and those
//!   batched renewals reach this shard; client heartbeats never leave the accepting shard. A
//!   user whose last session closes stays online for a grace period, so a quick reconnect does
//!   not flap. Changes go to the user's direct-conversation peers and to explicit subscribers.
//!   Last-seen times are written in batches;
//! - **push notifications**: messages for users with no session are coalesced per user and
//!   conversation over a window, persisted, and handed to the webhook delivery task.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use switchboard_protocol::{
    ConversationKind, Encoded, Presence, ServerFrame, SharedFrame, server_frame, validate,
};
use tokio::sync::oneshot;

use super::mailbox::{HomeMsg, LocalMsg, Outgoing};
use super::{SessionRef, home_shard};
use crate::cluster::NodeId;
use crate::cluster::presence::{Aggregator, Incoming, Live, Order, Out, Watch, wire};
use crate::config::Config;
use crate::push::{Notification, summary};
use crate::shard::owner::now_ms;
use crate::storage::{Ks, Storage, StoredPush, StoredUser, WriteOp, keys};

/// Offline records are kept this long before a query falls back to storage.
const OFFLINE_RECORD_TTL: Duration = Duration::from_secs(3600);
/// Direct peers loaded per user.
const MAX_PEERS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Record {
    online: bool,
    devices: u32,
    /// Online: since when. Offline: last seen.
    at_ms: u64,
}

struct RecordExpiry {
    lease: Duration,
}

impl moka::Expiry<Arc<str>, Record> for RecordExpiry {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        v: &Record,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(if v.online { self.lease } else { OFFLINE_RECORD_TTL })
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        v: &Record,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(if v.online { self.lease } else { OFFLINE_RECORD_TTL })
    }
}

#[derive(Debug, Clone)]
struct Pending {
    count: u64,
    latest_sender: Arc<str>,
    first_seq: u64,
    last_seq: u64,
    name: String,
    kind: i32,
    window_start_ms: u64,
    due_ms: u64,
    due: Instant,
}

impl Pending {
    fn stored(&self) -> StoredPush {
        StoredPush {
            count: self.count,
            latest_sender: self.latest_sender.to_string(),
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            conversation_name: self.name.clone(),
            conversation_kind: self.kind,
            window_start_ms: self.window_start_ms,
            due_ms: self.due_ms,
        }
    }
}

/// A notification ready for the webhook.
#[derive(Debug, Clone)]
pub struct PushJob {
    /// Who.
    pub user: Arc<str>,
    /// Where.
    pub conversation: Arc<str>,
    /// The body (its `sent_at_ms` is refreshed per attempt).
    pub notification: Notification,
    /// Attempts made so far.
    pub attempts: u32,
}

/// Home-shard state.
pub struct Home {
    grace: Duration,
    window: Duration,
    max_sessions: usize,
    push: bool,
    max_attempts: u32,
    storage: Arc<Storage>,
    shards: usize,
    sessions: HashMap<Arc<str>, Vec<SessionRef>>,
    records: moka::sync::Cache<Arc<str>, Record>,
    expired: Arc<Mutex<Vec<Arc<str>>>>,
    in_grace: HashMap<Arc<str>, (u64, u64)>,
    grace_queue: VecDeque<(Instant, Arc<str>, u64)>,
    next_epoch: u64,
    subscribers: HashMap<Arc<str>, Vec<SessionRef>>,
    peers: HashMap<Arc<str>, Vec<Arc<str>>>,
    /// The reverse of `peers`: for a user, this shard's online users that have them as a
    /// direct peer (cluster: a change from another node reaches them through this).
    followers: HashMap<Arc<str>, HashSet<Arc<str>>>,
    last_seen_dirty: HashMap<Arc<str>, u64>,
    pending: HashMap<Arc<str>, HashMap<Arc<str>, Pending>>,
    push_dirty: HashSet<(Arc<str>, Arc<str>)>,
    /// Rows to delete: (user, conversation, first_seq).
    push_deleted: Vec<(Arc<str>, Arc<str>, u64)>,
    ready: VecDeque<(Instant, PushJob)>,
    /// Presence across nodes, in a cluster.
    cluster: Option<Clustered>,
}

/// A home shard's part in presence across nodes (`cluster::presence`).
#[derive(Debug)]
struct Clustered {
    /// This shard's index (reports are per node and shard).
    shard: u32,
    live: Live,
    /// Users homed on this node (and shard): who reports them online where.
    agg: Aggregator,
    /// Which users of the cluster are online, per their home nodes.
    watch: Watch,
    /// The newest batch seen from each node's shard.
    order: Order,
}

impl std::fmt::Debug for Home {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Home").field("users", &self.sessions.len()).finish_non_exhaustive()
    }
}

fn presence(user: &str, r: Option<Record>) -> Presence {
    match r {
        Some(r) => Presence {
            user_id: user.to_owned(),
            online: r.online,
            devices: r.devices,
            last_seen_ms: r.at_ms,
        },
        None => Presence { user_id: user.to_owned(), online: false, devices: 0, last_seen_ms: 0 },
    }
}

fn group_by_shard(sessions: &[SessionRef]) -> HashMap<usize, Vec<u64>> {
    let mut by: HashMap<usize, Vec<u64>> = HashMap::new();
    for s in sessions {
        by.entry(s.shard).or_default().push(s.id);
    }
    by
}

impl Home {
    /// The home role of one shard.
    #[must_use]
    pub fn new(config: &Config, storage: Arc<Storage>, shards: usize) -> Self {
        let expired: Arc<Mutex<Vec<Arc<str>>>> = Arc::default();
        let sink = expired.clone();
        let lease = Duration::from_millis(config.server.idle_timeout_ms.saturating_mul(2));
        let records = moka::sync::Cache::builder()
            .max_capacity(1 << 22)
            .expire_after(RecordExpiry { lease })
            .eviction_listener(move |user: Arc<Arc<str>>, record: Record, cause| {
                if record.online && cause == moka::notification::RemovalCause::Expired {
                    sink.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((*user).clone());
                }
            })
            .build();
        Self {
            grace: Duration::from_millis(config.presence.grace_ms),
            window: Duration::from_millis(config.push.window_ms),
            max_sessions: config.limits.max_connections_per_user,
            push: config.push.webhook_url.is_some(),
            max_attempts: config.push.max_attempts,
            storage,
            shards,
            sessions: HashMap::new(),
            records,
            expired,
            in_grace: HashMap::new(),
            grace_queue: VecDeque::new(),
            next_epoch: 1,
            subscribers: HashMap::new(),
            peers: HashMap::new(),
            followers: HashMap::new(),
            last_seen_dirty: HashMap::new(),
            pending: HashMap::new(),
            push_dirty: HashSet::new(),
            push_deleted: Vec::new(),
            ready: VecDeque::new(),
            cluster: None,
        }
    }

    /// Turns on presence across nodes: local changes are reported to each user's home node,
    /// and this shard aggregates the users homed here (`cluster::presence`).
    pub fn enable_cluster(&mut self, shard: usize, me: NodeId, generation: u64) {
        self.cluster = Some(Clustered {
            shard: u32::try_from(shard).unwrap_or(u32::MAX),
            live: Live::alone(me, generation),
            agg: Aggregator::default(),
            watch: Watch::default(),
            order: Order::default(),
        });
    }

    /// The live nodes, in a cluster.
    #[must_use]
    pub fn live(&self) -> Option<&Live> {
        self.cluster.as_ref().map(|c| &c.live)
    }

    /// Handles a home message.
    pub fn handle(&mut self, msg: HomeMsg, out: &mut Outgoing) {
        match msg {
            HomeMsg::SessionUp { user, session, ack } => self.session_up(user, session, ack, out),
            HomeMsg::SessionDown { user, session } => self.session_down(&user, session, out),
            HomeMsg::UserEvent { user, event } => {
                if event.added
                    && event.conversation.starts_with(validate::DIRECT_PREFIX)
                    && let Some(peers) = self.peers.get_mut(&user)
                {
                    let pair = event.conversation.trim_start_matches(validate::DIRECT_PREFIX);
                    if let Some(peer) = pair.split(':').find(|p| *p != &*user) {
                        let peer: Arc<str> = Arc::from(peer);
                        peers.push(peer.clone());
                        if self.cluster.is_some() {
                            self.followers.entry(peer).or_default().insert(user.clone());
                        }
                    }
                }
                let Some(sessions) = self.sessions.get(&user) else { return };
                for (shard, sessions) in group_by_shard(sessions) {
                    out.push_local(
                        shard,
                        LocalMsg::UserEvent { sessions, user: user.clone(), event: event.clone() },
                    );
                }
            }
            HomeMsg::Renew { users } => {
                for user in users {
                    if let Some(r) = self.records.get(&user)
                        && r.online
                    {
                        self.records.insert(user, r);
                    }
                }
            }
            HomeMsg::PresenceQuery { users, reply } => {
                let answer = users.iter().map(|u| self.current(u)).collect();
                let _ = reply.send(answer);
            }
            HomeMsg::PresenceSubscribe { session, users, reply } => {
                let answer = users.iter().map(|u| self.current(u)).collect();
                for u in users {
                    let subs = self.subscribers.entry(u).or_default();
                    if !subs.contains(&session) {
                        subs.push(session);
                    }
                }
                let _ = reply.send(answer);
            }
            HomeMsg::PresenceUnsubscribe { session, users } => {
                for u in users {
                    if let Some(subs) = self.subscribers.get_mut(&u) {
                        subs.retain(|s| *s != session);
                        if subs.is_empty() {
                            self.subscribers.remove(&u);
                        }
                    }
                }
            }
            HomeMsg::PresenceNotify { users, frame } => {
                for u in users {
                    if let Some(sessions) = self.sessions.get(&u) {
                        for (shard, sessions) in group_by_shard(sessions) {
                            out.push_local(
                                shard,
                                LocalMsg::Push { sessions, frame: frame.clone(), droppable: false },
                            );
                        }
                    }
                }
            }
            HomeMsg::Notify(n) => self.notify(&n),
            HomeMsg::Presence(incoming) => self.incoming(*incoming, out),
            HomeMsg::PeerPresence { user, frame } => {
                let Some(followers) = self.followers.get(&user) else { return };
                for f in followers {
                    let Some(sessions) = self.sessions.get(f) else { continue };
                    for (shard, sessions) in group_by_shard(sessions) {
                        out.push_local(
                            shard,
                            LocalMsg::Push { sessions, frame: frame.clone(), droppable: false },
                        );
                    }
                }
            }
            HomeMsg::Read { user, conversation, read_seq } => {
                if let Some(convs) = self.pending.get_mut(&user)
                    && convs.get(&conversation).is_some_and(|p| p.last_seq <= read_seq)
                    && let Some(p) = convs.remove(&conversation)
                {
                    self.push_dirty.remove(&(user.clone(), conversation.clone()));
                    self.push_deleted.push((user, conversation, p.first_seq));
                }
            }
        }
    }

    /// Presence as a home shard knows it; `None` when it has no record (the caller may look
    /// up the stored last-seen time).
    fn current(&self, user: &Arc<str>) -> Option<Presence> {
        if let Some(c) = &self.cluster {
            return c.agg.current(user);
        }
        if let Some(s) = self.sessions.get(user) {
            let r = self.records.get(user);
            let at = r.map_or_else(now_ms, |r| r.at_ms);
            return Some(presence(
                user,
                Some(Record { online: true, devices: len_u32(s.len()), at_ms: at }),
            ));
        }
        if self.in_grace.contains_key(user) {
            return Some(presence(
                user,
                self.records.get(user).map(|r| Record { devices: 0, ..r }),
            ));
        }
        self.records.get(user).map(|r| presence(user, Some(r)))
    }

    fn session_up(
        &mut self,
        user: Arc<str>,
        session: SessionRef,
        ack: oneshot::Sender<bool>,
        out: &mut Outgoing,
    ) {
        let count = self.sessions.get(&user).map_or(0, Vec::len);
        if count >= self.max_sessions {
            let _ = ack.send(false);
            return;
        }
        if count == 0 {
            metrics::gauge!(crate::metrics::ONLINE_USERS).increment(1.0);
        }
        self.sessions.entry(user.clone()).or_default().push(session);
        let _ = ack.send(true);
        self.cancel_pushes(&user);
        let devices = len_u32(count + 1);
        let was_online = count > 0 || self.in_grace.remove(&user).is_some();
        let at_ms = if was_online {
            self.records.get(&user).map_or_else(now_ms, |r| r.at_ms)
        } else {
            now_ms()
        };
        let record = Record { online: true, devices, at_ms };
        self.records.insert(user.clone(), record);
        if !was_online {
            if !self.peers.contains_key(&user) {
                let peers: Vec<Arc<str>> = self
                    .storage
                    .reader()
                    .direct_peers(&user, MAX_PEERS)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| Arc::from(p.as_str()))
                    .collect();
                if self.cluster.is_some() {
                    for p in &peers {
                        self.followers.entry(p.clone()).or_default().insert(user.clone());
                    }
                }
                self.peers.insert(user.clone(), peers);
            }
            if self.cluster.is_none() {
                self.push_presence(presence(&user, Some(record)), out);
            }
        }
        self.report(&user, out);
    }

    fn session_down(&mut self, user: &Arc<str>, session: SessionRef, out: &mut Outgoing) {
        let Some(sessions) = self.sessions.get_mut(user) else { return };
        sessions.retain(|s| *s != session);
        if !sessions.is_empty() {
            let devices = len_u32(sessions.len());
            if let Some(r) = self.records.get(user) {
                self.records.insert(user.clone(), Record { devices, ..r });
            }
            self.report(user, out);
            return;
        }
        self.sessions.remove(user);
        metrics::gauge!(crate::metrics::ONLINE_USERS).decrement(1.0);
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.in_grace.insert(user.clone(), (epoch, now_ms()));
        self.grace_queue.push_back((Instant::now() + self.grace, user.clone(), epoch));
        self.report(user, out);
    }

    fn go_offline(&mut self, user: &Arc<str>, last_seen_ms: u64, out: &mut Outgoing) {
        let record = Record { online: false, devices: 0, at_ms: last_seen_ms };
        self.records.insert(user.clone(), record);
        self.last_seen_dirty.insert(user.clone(), last_seen_ms);
        if self.cluster.is_none() {
            self.push_presence(presence(user, Some(record)), out);
        }
        self.report(user, out);
        let peers = self.peers.remove(user).unwrap_or_default();
        if self.cluster.is_some() {
            for p in peers {
                if let Some(f) = self.followers.get_mut(&p) {
                    f.remove(user);
                    if f.is_empty() {
                        self.followers.remove(&p);
                    }
                }
            }
        }
    }

    /// This node's presence of `user` (its sessions here), as reported to the home node.
    fn local_report(&self, user: &Arc<str>) -> wire::Report {
        let record = self.records.get(user);
        let at_ms = record.map_or_else(now_ms, |r| r.at_ms);
        let (online, devices) = match self.sessions.get(user) {
            Some(s) => (true, len_u32(s.len())),
            None => (self.in_grace.contains_key(user), 0),
        };
        wire::Report { user: user.to_string(), online, devices, at_ms }
    }

    /// Reports a change of `user`'s local presence to the user's home node (cluster).
    fn report(&mut self, user: &Arc<str>, out: &mut Outgoing) {
        if self.cluster.is_none() {
            return;
        }
        let report = self.local_report(user);
        let Some(c) = &mut self.cluster else { return };
        let home = c.live.home(user);
        if home == c.live.me {
            let (reporter, generation) = ((c.live.me, c.shard), c.live.generation);
            let live = &c.live;
            let is_home = |u: &str| live.home(u) == live.me;
            let changes =
                c.agg.report(reporter, generation, None, vec![report], live, is_home, now_ms());
            self.announce(changes, out);
        } else {
            out.presence.push((home, Out::Report(report)));
        }
    }

    /// Sends every live node the local users homed there (an empty list too: it clears what
    /// the node holds from this shard).
    pub fn snapshot(&mut self, out: &mut Outgoing) {
        let Some(c) = &self.cluster else { return };
        let mut by_home: HashMap<NodeId, Vec<wire::Report>> =
            c.live.nodes.keys().map(|n| (*n, Vec::new())).collect();
        for user in self.sessions.keys().chain(self.in_grace.keys()) {
            by_home.entry(c.live.home(user)).or_default().push(self.local_report(user));
        }
        let seen: Vec<NodeId> = c.live.nodes.keys().copied().collect();
        for (node, reports) in by_home {
            let snapshot = wire::Snapshot { reports, live: seen.clone() };
            let Some(c) = &mut self.cluster else { return };
            if node == c.live.me {
                let (reporter, generation) = ((c.live.me, c.shard), c.live.generation);
                let live = &c.live;
                let is_home = |u: &str| live.home(u) == live.me;
                let changes = c.agg.report(
                    reporter,
                    generation,
                    Some(snapshot),
                    Vec::new(),
                    live,
                    is_home,
                    now_ms(),
                );
                self.announce(changes, out);
            } else {
                out.presence.push((node, Out::Snapshot(snapshot)));
            }
        }
    }

    /// Periodic upkeep (every heartbeat interval): drops entries of reporters gossip never
    /// saw live for long, and sends every other live node the online users homed on this
    /// shard, so that a change one of them missed is repaired (`Watch::sync`); this node's
    /// own watch is checked against the same list.
    pub fn sync(&mut self, out: &mut Outgoing) {
        let Some(c) = &mut self.cluster else { return };
        let now = now_ms();
        let live = &c.live;
        let is_home = |u: &str| live.home(u) == live.me;
        let changes = c.agg.retain(live, is_home, is_home, now);
        let set = wire::OnlineSet {
            users: c.agg.all_online(is_home),
            live: c.live.nodes.keys().copied().collect(),
        };
        for node in c.live.others() {
            out.presence.push((node, Out::Online(set.clone())));
        }
        let me = (c.live.me, c.shard);
        let generation = c.live.generation;
        let mut pushes = c.watch.sync(me, generation, self.shards, &set, &c.live, now);
        self.announce(changes, out);
        for p in pushes.drain(..) {
            self.push_presence(p, out);
        }
    }

    /// Takes in a new set of live nodes: drops the entries of nodes gone or restarted (and
    /// of users whose home moved elsewhere), turns offline the users whose home node died
    /// with every node they were online through, sends nodes that came up (or restarted) the
    /// online users homed here, and sends snapshots (homes may have moved).
    pub fn set_live(&mut self, live: Live, out: &mut Outgoing) {
        let Some(c) = &mut self.cluster else { return };
        if c.live.nodes == live.nodes {
            return;
        }
        let live = live.after(&c.live);
        let before = std::mem::replace(&mut c.live, live);
        let now = now_ms();
        let live = &c.live;
        let was_home = |u: &str| before.home(u) == before.me;
        let changes = c.agg.retain(live, |u| live.home(u) == live.me, was_home, now);
        let came: Vec<NodeId> = c.live.came(&before).collect();
        c.watch.gone(&c.live, now);
        if !came.is_empty() {
            let set = wire::OnlineSet {
                users: c.agg.all_online(|u| live.home(u) == live.me),
                live: c.live.nodes.keys().copied().collect(),
            };
            for node in came {
                out.presence.push((node, Out::Online(set.clone())));
            }
        }
        self.announce(changes, out);
        self.snapshot(out);
    }

    /// Takes in a batch part from another node: reports for users homed here, changes and
    /// syncs from other users' home nodes. A batch older than one already taken in from the
    /// same shard of that node, or from a node gossip knows as dead, leaving or restarted
    /// since, is ignored.
    fn incoming(&mut self, inc: Incoming, out: &mut Outgoing) {
        let Some(c) = &mut self.cluster else { return };
        let (node, generation) = (inc.origin.from.0, inc.origin.generation);
        if !c.live.counts(node, generation) || !c.order.fresh(inc.origin) {
            return;
        }
        let now = now_ms();
        let mut pushes = Vec::new();
        for change in &inc.changed {
            pushes.extend(c.watch.apply(inc.origin.from, generation, change));
        }
        if let Some(set) = &inc.online {
            let from = inc.origin.from;
            pushes.extend(c.watch.sync(from, generation, inc.shards, set, &c.live, now));
        }
        if inc.snapshot.is_some() || !inc.reports.is_empty() {
            let live = &c.live;
            let changes = c.agg.report(
                inc.origin.from,
                generation,
                inc.snapshot,
                inc.reports,
                live,
                |u| live.home(u) == live.me,
                now,
            );
            self.announce(changes, out);
        }
        for p in pushes {
            self.push_presence(p, out);
        }
    }

    /// Sends changes of users homed here to every other live node and applies them here; an
    /// offline aggregate's last-seen time is stored here.
    fn announce(&mut self, changes: Vec<wire::Changed>, out: &mut Outgoing) {
        let Some(c) = &mut self.cluster else { return };
        let me = (c.live.me, c.shard);
        let generation = c.live.generation;
        let mut pushes = Vec::new();
        for change in changes {
            for node in c.live.others() {
                out.presence.push((node, Out::Changed(change.clone())));
            }
            if let Some(p) = change.presence.as_ref().filter(|p| !p.online) {
                self.last_seen_dirty.insert(Arc::from(p.user_id.as_str()), p.last_seen_ms);
            }
            pushes.extend(c.watch.apply(me, generation, &change));
        }
        for p in pushes {
            self.push_presence(p, out);
        }
    }

    /// Pushes a presence change to the user's subscribers and direct peers with sessions
    /// here (called on the user's home shard). In a cluster the peers are found through
    /// every shard's `followers`; on a single node through the user's own peer list.
    fn push_presence(&mut self, presence: Presence, out: &mut Outgoing) {
        let user: Arc<str> = Arc::from(presence.user_id.as_str());
        if presence.online && self.cluster.is_some() {
            // Online on some node: what waits for the push window is not needed any more.
            self.cancel_pushes(&user);
        }
        let frame: SharedFrame =
            Encoded::of(&ServerFrame::push(server_frame::Kind::Presence(presence)));
        if let Some(subs) = self.subscribers.get(&user) {
            for (shard, sessions) in group_by_shard(subs) {
                out.push_local(
                    shard,
                    LocalMsg::Push { sessions, frame: frame.clone(), droppable: false },
                );
            }
        }
        if self.cluster.is_some() {
            for shard in 0..self.shards {
                let msg = HomeMsg::PeerPresence { user: user.clone(), frame: frame.clone() };
                out.home_at.push((shard, msg));
            }
            return;
        }
        let Some(peers) = self.peers.get(&user) else { return };
        let mut by_home: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
        for p in peers {
            by_home.entry(home_shard(p, self.shards)).or_default().push(p.clone());
        }
        for (_, users) in by_home {
            if let Some(first) = users.first().cloned() {
                out.home.push((first, HomeMsg::PresenceNotify { users, frame: frame.clone() }));
            }
        }
    }

    fn notify(&mut self, n: &super::mailbox::NotifyMsg) {
        if !self.push {
            return;
        }
        let now = Instant::now();
        let now_wall = now_ms();
        let window = self.window;
        for user in &n.users {
            // Online here, or (in a cluster) on another node: the message reaches them live.
            let elsewhere = self.cluster.as_ref().is_some_and(|c| c.watch.is_online(user));
            if elsewhere || self.sessions.contains_key(user) {
                continue;
            }
            let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
            let p = self
                .pending
                .entry(user.clone())
                .or_default()
                .entry(n.conversation.clone())
                .or_insert_with(|| Pending {
                    count: 0,
                    latest_sender: n.sender.clone(),
                    first_seq: n.seq,
                    last_seq: n.seq,
                    name: n.name.clone(),
                    kind: n.kind,
                    window_start_ms: now_wall,
                    due_ms: now_wall + window_ms,
                    due: now + window,
                });
            p.count += 1;
            p.last_seq = p.last_seq.max(n.seq);
            p.latest_sender = n.sender.clone();
            self.push_dirty.insert((user.clone(), n.conversation.clone()));
        }
    }

    fn cancel_pushes(&mut self, user: &Arc<str>) {
        if let Some(convs) = self.pending.remove(user) {
            for (conv, p) in convs {
                self.push_dirty.remove(&(user.clone(), conv.clone()));
                self.push_deleted.push((user.clone(), conv, p.first_seq));
            }
        }
        let before = self.ready.len();
        let deleted = &mut self.push_deleted;
        self.ready.retain(|(_, job)| {
            let keep = job.user != *user;
            if !keep {
                deleted.push((
                    job.user.clone(),
                    job.conversation.clone(),
                    job.notification.first_seq,
                ));
            }
            keep
        });
        if before != self.ready.len() {
            tracing::debug!(%user, "cancelled push notifications: user came online");
        }
    }

    /// Loads pending push notifications of this shard's users after a restart.
    pub fn restore_pushes(&mut self, shard: usize) {
        if !self.push {
            return;
        }
        let rows = match self.storage.reader().pending_pushes() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot load pending push notifications");
                return;
            }
        };
        let now = Instant::now();
        let now_wall = now_ms();
        for (user, conv, p) in rows {
            if home_shard(&user, self.shards) != shard {
                continue;
            }
            let due = now + Duration::from_millis(p.due_ms.saturating_sub(now_wall));
            self.pending.entry(Arc::from(user.as_str())).or_default().insert(
                Arc::from(conv.as_str()),
                Pending {
                    count: p.count,
                    latest_sender: Arc::from(p.latest_sender.as_str()),
                    first_seq: p.first_seq,
                    last_seq: p.last_seq,
                    name: p.conversation_name,
                    kind: p.conversation_kind,
                    window_start_ms: p.window_start_ms,
                    due_ms: p.due_ms,
                    due,
                },
            );
        }
    }

    /// Periodic work: grace periods, lapsed leases, due notifications. Returns writes for the
    /// shard's next batch when `flush` (last seen, pending notifications).
    pub fn tick(&mut self, now: Instant, flush: bool, out: &mut Outgoing) -> Vec<WriteOp> {
        if let Some(c) = &mut self.cluster {
            for p in c.watch.due(now_ms()) {
                self.push_presence(p, out);
            }
        }
        while let Some((due, _, _)) = self.grace_queue.front() {
            if *due > now {
                break;
            }
            let Some((_, user, epoch)) = self.grace_queue.pop_front() else { break };
            if let Some(&(e, dropped_at)) = self.in_grace.get(&user)
                && e == epoch
            {
                self.in_grace.remove(&user);
                self.go_offline(&user, dropped_at, out);
            }
        }
        if flush {
            self.records.run_pending_tasks();
            let lapsed: Vec<Arc<str>> = std::mem::take(
                &mut *self.expired.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for user in lapsed {
                if self.records.get(&user).is_none_or(|r| r.online) {
                    tracing::warn!(%user, "presence lease lapsed; marking offline");
                    if self.sessions.remove(&user).is_some() {
                        metrics::gauge!(crate::metrics::ONLINE_USERS).decrement(1.0);
                    }
                    self.go_offline(&user, now_ms(), out);
                }
            }
        }
        let mut due = Vec::new();
        for (user, convs) in &mut self.pending {
            convs.retain(|conv, p| {
                if p.due <= now {
                    due.push((user.clone(), conv.clone(), p.clone()));
                    false
                } else {
                    true
                }
            });
        }
        self.pending.retain(|_, convs| !convs.is_empty());
        let mut ops = Vec::new();
        for (user, conv, p) in due {
            // Persist it now if the window closed before it was ever written, so a retrying
            // delivery survives a restart.
            if self.push_dirty.remove(&(user.clone(), conv.clone())) {
                ops.push(WriteOp::Put(
                    Ks::Push,
                    keys::push_key(&user, &conv, p.first_seq),
                    p.stored().encode_to_vec(),
                ));
            }
            let kind = if p.kind == ConversationKind::Group as i32 { "group" } else { "direct" };
            let notification = Notification {
                id: format!("{user}/{conv}/{}", p.last_seq),
                user_id: user.to_string(),
                conversation_id: conv.to_string(),
                conversation_kind: kind,
                conversation_name: p.name.clone(),
                count: p.count,
                latest_sender: p.latest_sender.to_string(),
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                text: summary(p.count, &p.latest_sender, &p.name),
                window_start_ms: p.window_start_ms,
                sent_at_ms: 0,
            };
            self.ready
                .push_back((now, PushJob { user, conversation: conv, notification, attempts: 0 }));
        }
        if flush {
            ops.extend(self.flush_writes());
        }
        ops
    }

    /// Takes the pending batched writes (last seen, push queue).
    pub fn flush_writes(&mut self) -> Vec<WriteOp> {
        let mut ops = Vec::new();
        for (user, last_seen_ms) in self.last_seen_dirty.drain() {
            ops.push(WriteOp::Put(
                Ks::Users,
                keys::user_key(&user),
                StoredUser { last_seen_ms }.encode_to_vec(),
            ));
        }
        for (user, conv) in self.push_dirty.drain() {
            if let Some(p) = self.pending.get(&user).and_then(|c| c.get(&conv)) {
                ops.push(WriteOp::Put(
                    Ks::Push,
                    keys::push_key(&user, &conv, p.first_seq),
                    p.stored().encode_to_vec(),
                ));
            }
        }
        for (user, conv, first_seq) in self.push_deleted.drain(..) {
            ops.push(WriteOp::Delete(Ks::Push, keys::push_key(&user, &conv, first_seq)));
        }
        ops
    }

    /// Marks every online user as last seen now (graceful shutdown); returns the writes.
    pub fn shutdown_writes(&mut self) -> Vec<WriteOp> {
        let now = now_ms();
        let users: Vec<Arc<str>> =
            self.sessions.keys().chain(self.in_grace.keys()).cloned().collect();
        for user in users {
            self.last_seen_dirty.insert(user, now);
        }
        self.flush_writes()
    }

    /// Notifications whose next attempt is due.
    pub fn take_ready(&mut self, now: Instant) -> Vec<PushJob> {
        let mut jobs = Vec::new();
        let mut later = VecDeque::new();
        while let Some((at, job)) = self.ready.pop_front() {
            if at <= now { jobs.push(job) } else { later.push_back((at, job)) }
        }
        self.ready = later;
        jobs
    }

    /// Records the outcome of a delivery attempt.
    pub fn push_done(&mut self, mut job: PushJob, delivered: bool) {
        job.attempts += 1;
        let online = self.sessions.contains_key(&job.user);
        if delivered || online || job.attempts >= self.max_attempts {
            if !delivered && !online {
                tracing::error!(user = %job.user, conversation = %job.conversation, attempts = job.attempts, "giving up on a push notification");
                metrics::counter!(crate::metrics::PUSH_WEBHOOK, "outcome" => "gave_up")
                    .increment(1);
            }
            self.push_deleted.push((job.user, job.conversation, job.notification.first_seq));
            return;
        }
        let at = Instant::now() + crate::push::backoff(job.attempts);
        self.ready.push_back((at, job));
    }

    /// Users homed here with at least one session on this node.
    #[must_use]
    pub fn online_users(&self) -> usize {
        self.sessions.len()
    }

    /// Number of sessions of `user` (all shards).
    #[must_use]
    pub fn session_count(&self, user: &str) -> usize {
        self.sessions.get(user).map_or(0, Vec::len)
    }
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The presence of users a home shard had no record of: offline, last seen as stored.
pub async fn stored_presence(
    storage: Arc<crate::storage::Storage>,
    users: Vec<Arc<str>>,
) -> Vec<switchboard_protocol::Presence> {
    if users.is_empty() {
        return Vec::new();
    }
    tokio::task::spawn_blocking(move || {
        let r = storage.reader();
        users
            .into_iter()
            .map(|u| {
                let last_seen_ms = r.last_seen(&u).ok().flatten().unwrap_or(0);
                switchboard_protocol::Presence {
                    user_id: u.to_string(),
                    online: false,
                    devices: 0,
                    last_seen_ms,
                }
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Durability, StorageConfig};

    fn home(grace_ms: u64) -> (Home, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageConfig {
            data_dir: dir.path().to_owned(),
            durability: Durability::Buffered,
            cache_mb: 8,
            ..StorageConfig::default()
        })
        .unwrap();
        let mut config = Config::default();
        config.presence.grace_ms = grace_ms;
        (Home::new(&config, storage, 1), dir)
    }

    fn up(h: &mut Home, user: &Arc<str>, id: u64, out: &mut Outgoing) -> bool {
        let (tx, mut rx) = oneshot::channel();
        h.handle(
            HomeMsg::SessionUp {
                user: user.clone(),
                session: SessionRef { shard: 0, id },
                ack: tx,
            },
            out,
        );
        rx.try_recv().unwrap()
    }

    fn subscribe(h: &mut Home, who: &Arc<str>, out: &mut Outgoing) {
        let (tx, _rx) = oneshot::channel();
        let session = SessionRef { shard: 0, id: 99 };
        h.handle(HomeMsg::PresenceSubscribe { session, users: vec![who.clone()], reply: tx }, out);
    }

    fn pushes(out: &Outgoing) -> usize {
        out.local.iter().flatten().filter(|m| matches!(m, LocalMsg::Push { .. })).count()
    }

    #[test]
    fn given_reconnect_within_grace_should_not_flap_and_after_grace_should_go_offline_once() {
        let (mut h, _dir) = home(5_000);
        let alice: Arc<str> = Arc::from("alice");
        let mut out = Outgoing::new(1);
        subscribe(&mut h, &alice, &mut out);
        assert!(up(&mut h, &alice, 1, &mut out));
        assert_eq!(pushes(&out), 1, "online");

        let mut out = Outgoing::new(1);
        h.handle(
            HomeMsg::SessionDown { user: alice.clone(), session: SessionRef { shard: 0, id: 1 } },
            &mut out,
        );
        let t0 = Instant::now();
        h.tick(t0 + Duration::from_millis(4_000), false, &mut out);
        assert!(up(&mut h, &alice, 2, &mut out), "back within the grace period");
        h.tick(t0 + Duration::from_millis(6_000), false, &mut out);
        assert_eq!(pushes(&out), 0, "no offline/online flap");
        assert!(h.current(&alice).is_some_and(|p| p.online && p.devices == 1));

        h.handle(
            HomeMsg::SessionDown { user: alice.clone(), session: SessionRef { shard: 0, id: 2 } },
            &mut out,
        );
        let t1 = Instant::now();
        h.tick(t1 + Duration::from_millis(4_999), false, &mut out);
        assert_eq!(pushes(&out), 0);
        assert!(
            h.current(&alice).is_some_and(|p| p.online && p.devices == 0),
            "online during grace"
        );
        let ops = h.tick(t1 + Duration::from_millis(5_001), true, &mut out);
        assert_eq!(pushes(&out), 1, "one offline push");
        assert!(h.current(&alice).is_some_and(|p| !p.online && p.last_seen_ms > 0));
        assert!(
            ops.iter().any(|op| matches!(op, WriteOp::Put(Ks::Users, k, _) if k == b"alice")),
            "last seen written"
        );
    }

    #[test]
    fn given_session_cap_should_refuse_the_next_session() {
        let (mut h, _dir) = home(5_000);
        h.max_sessions = 2;
        let bob: Arc<str> = Arc::from("bob");
        let mut out = Outgoing::new(1);
        assert!(up(&mut h, &bob, 1, &mut out));
        assert!(up(&mut h, &bob, 2, &mut out));
        assert!(!up(&mut h, &bob, 3, &mut out));
        assert_eq!(h.session_count("bob"), 2);
    }
}
