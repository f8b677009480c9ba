//! Presence across nodes: every user's presence is decided on one node, the user's **home
//! node**, the live node with the highest rendezvous score `xxh3_64(user ‖ node id as u64
//! big-endian)` (gossip's live nodes, leaving ones excluded).
//!
//! - **Reports.** On every node, the user's home *shard* knows the user's sessions there (its
//!   local presence, with the grace period of a closed last session). It reports each change
//!   (online with devices and since when, offline with last seen) to the user's home node.
//!   Every `server.heartbeat_interval_ms`, and at once whenever the set of live nodes changes,
//!   it also sends every live node a **snapshot**: all of its local users homed there. A
//!   snapshot replaces what the home node held from that reporter (node, shard), so a lost
//!   report or a change of home node is repaired by the next one.
//! - **Aggregation** ([`Aggregator`], on the home node): per user, the entries of the reporters
//!   that say the user is online, each tagged with the reporter's generation. The user is online
//!   while any entry is; devices are summed; since is the earliest. Entries of a node that
//!   gossip no longer sees live, or sees with a newer generation (a restart), are dropped at
//!   once: a dead node's users turn offline within failure detection, a restarted node's stale
//!   entries at the first sight of its new generation.
//! - **Changes** (online ↔ offline) go from the home node to every live node, each delivering
//!   them to its subscribers and to the user's direct peers with sessions there. Each node
//!   remembers through which nodes a user is online ([`Watch`]); when all of them are gone it
//!   delivers the offline change itself, since the home node may have died with them.
//! - **Queries** go to the home node; users it has no record of are answered from its store
//!   (last seen, written when the aggregate turns offline).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_protocol::Presence;
use xxhash_rust::xxh3::xxh3_64;

use tokio::sync::mpsc;

use super::NodeId;
use super::membership::View;
use crate::shard::{HomeMsg, ShardMsg, home_shard};
use crate::storage::Storage;

/// Peer path that receives reports, snapshots and changes ([`wire::Batch`]).
pub const PATH: &str = "/presence";

/// Peer path that answers presence queries for users homed on the node ([`wire::Query`] →
/// `PresenceList`).
pub const QUERY_PATH: &str = "/presence/query";

/// Most users in one query from another node (clients ask for at most
/// `limits.max_presence_users` at a time).
const MAX_QUERY: usize = 10_000;

/// How long a node waits, after a user's home node died together with every node the user
/// was online through, for a new home node to say the user is still online (its view of the
/// user's nodes may have been behind), before it turns the user offline itself.
pub const WATCH_GRACE_MS: u64 = 3_000;

/// How long reports of a node gossip has never seen live count before they are dropped.
pub const UNKNOWN_GRACE_MS: u64 = 30_000;

/// Offline users whose last-seen time the aggregator keeps in memory.
const LAST_SEEN_CAPACITY: u64 = 1 << 20;
/// How long it keeps them (then the store answers).
const LAST_SEEN_TTL: Duration = Duration::from_secs(3600);

pub mod wire {
    //! Presence messages between nodes (protobuf over HTTP on the peer port).

    /// One user's presence on the reporting node.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Report {
        /// The user.
        #[prost(string, tag = "1")]
        pub user: String,
        /// Online on the reporting node (sessions, or the grace period after the last).
        #[prost(bool, tag = "2")]
        pub online: bool,
        /// Open sessions there.
        #[prost(uint32, tag = "3")]
        pub devices: u32,
        /// Online: since when (ms since the epoch). Offline: last seen.
        #[prost(uint64, tag = "4")]
        pub at_ms: u64,
    }

    /// Everything a reporter holds for the receiving node: replaces its previous reports.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Snapshot {
        /// The reporter's online users homed on the receiving node.
        #[prost(message, repeated, tag = "1")]
        pub reports: Vec<Report>,
        /// The live nodes as the reporter saw them (homes depend on them).
        #[prost(uint64, repeated, tag = "2")]
        pub live: Vec<u64>,
    }

    /// A change of a user's presence, from the user's home node.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Changed {
        /// The new presence.
        #[prost(message, optional, tag = "1")]
        pub presence: Option<switchboard_protocol::Presence>,
        /// The nodes where the user is online (empty when offline).
        #[prost(uint64, repeated, tag = "2")]
        pub nodes: Vec<u64>,
    }

    /// What one shard of one node sends another node, applied in this order: the snapshot,
    /// the reports, the changes, the online set.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Batch {
        /// The sending node.
        #[prost(uint64, tag = "1")]
        pub node: u64,
        /// Its generation.
        #[prost(uint64, tag = "2")]
        pub generation: u64,
        /// The sending shard (reports are per node and shard).
        #[prost(uint32, tag = "3")]
        pub shard: u32,
        /// A snapshot, if one was taken since the last batch.
        #[prost(message, optional, tag = "4")]
        pub snapshot: Option<Snapshot>,
        /// Reports made after the snapshot, in order.
        #[prost(message, repeated, tag = "5")]
        pub reports: Vec<Report>,
        /// Changes of users homed on the sending node, in order.
        #[prost(message, repeated, tag = "6")]
        pub changed: Vec<Changed>,
        /// The batch's number in the sending shard's order towards the receiving node.
        #[prost(uint64, tag = "7")]
        pub seq: u64,
        /// The sending node's shard count.
        #[prost(uint32, tag = "8")]
        pub shards: u32,
        /// Every online user homed on the sending shard, if a sync is due (after `changed`).
        #[prost(message, optional, tag = "9")]
        pub online: Option<OnlineSet>,
    }

    /// Every online user homed on the sending shard.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OnlineSet {
        /// Their presence and the nodes they are online through.
        #[prost(message, repeated, tag = "1")]
        pub users: Vec<Changed>,
        /// The live nodes as the sender saw them (homes depend on them).
        #[prost(uint64, repeated, tag = "2")]
        pub live: Vec<u64>,
    }

    /// The presence of users homed on the receiving node.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Query {
        /// The users.
        #[prost(string, repeated, tag = "1")]
        pub users: Vec<String>,
    }
}

/// The rendezvous score of `node` for `user`.
#[must_use]
pub fn score(user: &str, node: NodeId) -> u64 {
    let mut key = Vec::with_capacity(user.len() + 8);
    key.extend_from_slice(user.as_bytes());
    key.extend_from_slice(&node.to_be_bytes());
    xxh3_64(&key)
}

/// The home node of `user` among `nodes`: the highest score (ties: the higher id).
#[must_use]
pub fn home_node(user: &str, nodes: impl IntoIterator<Item = NodeId>) -> Option<NodeId> {
    nodes.into_iter().max_by_key(|n| (score(user, *n), *n))
}

/// The nodes as gossip sees them: the live ones with their generation and peer address, and
/// the ones seen live before that are not any more (dead or leaving), with their generation
/// then ([`Live::after`]). A node gossip has discovered but never seen live is neither.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// This node.
    pub me: NodeId,
    /// Its generation.
    pub generation: u64,
    /// Live nodes (this one included), with their generation and peer address.
    pub nodes: BTreeMap<NodeId, (u64, Option<SocketAddr>)>,
    /// Nodes seen live before and not live now, with their generation then.
    pub down: BTreeMap<NodeId, u64>,
}

impl Live {
    /// Only this node (before gossip has said anything).
    #[must_use]
    pub fn alone(me: NodeId, generation: u64) -> Self {
        Self {
            me,
            generation,
            nodes: BTreeMap::from([(me, (generation, None))]),
            down: BTreeMap::new(),
        }
    }

    /// The live, not leaving, members of `view`, and this node in any case (`down` empty:
    /// see [`Live::after`]).
    #[must_use]
    pub fn of(view: &View) -> Self {
        let mut live = Self::alone(view.self_id, view.generation);
        for m in view.members.iter().filter(|m| m.live && !m.leaving && m.id != view.self_id) {
            live.nodes.insert(m.id, (m.generation, Some(m.gossip)));
        }
        live
    }

    /// This view of live nodes, following `before`: nodes live then and not now join `down`.
    #[must_use]
    pub fn after(mut self, before: &Self) -> Self {
        let mut down = before.down.clone();
        for (n, (g, _)) in &before.nodes {
            if !self.nodes.contains_key(n) {
                down.insert(*n, *g);
            }
        }
        down.retain(|n, _| !self.nodes.contains_key(n));
        self.down = down;
        self
    }

    /// The home node of `user`.
    #[must_use]
    pub fn home(&self, user: &str) -> NodeId {
        home_node(user, self.nodes.keys().copied()).unwrap_or(self.me)
    }

    /// Whether what `node` says in `generation` counts: gossip knows no newer generation of
    /// it, and does not know that generation as dead or leaving. A node gossip has not heard
    /// of yet counts (its messages may outrun gossip).
    #[must_use]
    pub fn counts(&self, node: NodeId, generation: u64) -> bool {
        match (self.nodes.get(&node), self.down.get(&node)) {
            (Some((g, _)), _) => *g <= generation,
            (None, Some(g)) => *g < generation,
            (None, None) => true,
        }
    }

    /// Whether `node` is live in `generation` (or gossip has not heard of that one yet).
    #[must_use]
    pub fn holds(&self, node: NodeId, generation: u64) -> bool {
        self.nodes.get(&node).is_some_and(|(g, _)| *g <= generation)
    }

    /// Whether `node` is live.
    #[must_use]
    pub fn is_live(&self, node: NodeId) -> bool {
        self.nodes.contains_key(&node)
    }

    /// The other live nodes.
    pub fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied().filter(move |n| *n != self.me)
    }

    /// Live nodes that are new in `self` compared with `before`, or restarted since.
    pub fn came<'a>(&'a self, before: &'a Self) -> impl Iterator<Item = NodeId> + 'a {
        self.others().filter(move |n| {
            before.nodes.get(n).map(|(g, _)| *g) != self.nodes.get(n).map(|(g, _)| *g)
        })
    }
}

/// A local presence change or snapshot to send, or a change to broadcast.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// A change of one user's local presence, for the user's home node.
    Report(wire::Report),
    /// Every local user homed on the receiving node.
    Snapshot(wire::Snapshot),
    /// A change of a user homed here, for every other node.
    Changed(wire::Changed),
    /// Every online user homed on this shard, for one other node.
    Online(wire::OnlineSet),
}

/// A reporter: a node and its shard.
pub type Reporter = (NodeId, u32);

/// Where a batch came from and its place in the sender's order: messages of an older
/// generation, or an older batch that arrived late, are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The sending node and shard.
    pub from: Reporter,
    /// The sender's generation.
    pub generation: u64,
    /// The batch's number in the sender's order towards this node.
    pub seq: u64,
}

/// The newest batch seen from each sender: older ones are stale (a batch whose request
/// timed out at the sender may still arrive after the next one).
#[derive(Debug, Default)]
pub struct Order {
    last: HashMap<Reporter, (u64, u64)>,
    /// The newest generation seen per node, whatever the shard: a shard the new incarnation
    /// does not have any more must not speak for the old one.
    generations: HashMap<NodeId, u64>,
}

impl Order {
    /// Whether a batch from `o` is newer than every one seen from its sender (and notes it).
    pub fn fresh(&mut self, o: Origin) -> bool {
        let newest = self.generations.entry(o.from.0).or_insert(o.generation);
        if o.generation < *newest {
            return false;
        }
        *newest = o.generation;
        let key = (o.generation, o.seq);
        match self.last.get(&o.from) {
            Some(last) if *last >= key => false,
            _ => {
                self.last.insert(o.from, key);
                true
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    reporter: Reporter,
    devices: u32,
    since_ms: u64,
}

/// The home node's view of its users: who reports them online where.
pub struct Aggregator {
    online: HashMap<Arc<str>, Vec<Entry>>,
    reporters: HashMap<Reporter, HashSet<Arc<str>>>,
    /// The newest generation seen per node: never forgotten, so a late message of an older
    /// generation cannot bring back entries dropped with it.
    generations: HashMap<NodeId, u64>,
    /// Reporting nodes gossip has not seen live yet, since when: kept for a while (their
    /// messages may outrun gossip), dropped after [`UNKNOWN_GRACE_MS`].
    unknown: HashMap<NodeId, u64>,
    last_seen: moka::sync::Cache<Arc<str>, u64>,
}

impl std::fmt::Debug for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Aggregator").field("online", &self.online.len()).finish_non_exhaustive()
    }
}

impl Default for Aggregator {
    fn default() -> Self {
        Self {
            online: HashMap::new(),
            reporters: HashMap::new(),
            generations: HashMap::new(),
            unknown: HashMap::new(),
            last_seen: moka::sync::Cache::builder()
                .max_capacity(LAST_SEEN_CAPACITY)
                .time_to_live(LAST_SEEN_TTL)
                .build(),
        }
    }
}

/// Each touched user's state before (online through which nodes, if online), and the latest
/// last-seen time reported for it.
#[derive(Default)]
struct Touched {
    before: HashMap<Arc<str>, Option<Vec<NodeId>>>,
    ended: HashMap<Arc<str>, u64>,
}

impl Aggregator {
    /// Applies what `reporter` (in `generation`) sent: a snapshot replaces everything it
    /// reported before (when the reporter saw the same live nodes as `live`; otherwise it
    /// may have left out users it thinks are homed elsewhere, and only its entries are
    /// applied), then each report in order. Ignored when `live` does not count the
    /// reporter's node in that generation (dead, leaving, or restarted since), or when a
    /// newer generation of it was seen. Returns the changes of users homed here per
    /// `is_home`: the online state flipped, or the set of nodes a user is online through
    /// changed.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &mut self,
        reporter: Reporter,
        generation: u64,
        snapshot: Option<wire::Snapshot>,
        reports: Vec<wire::Report>,
        live: &Live,
        is_home: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> Vec<wire::Changed> {
        let node = reporter.0;
        if !live.counts(node, generation)
            || self.generations.get(&node).is_some_and(|g| *g > generation)
        {
            return Vec::new();
        }
        let mut t = Touched::default();
        if self.generations.get(&node).is_some_and(|g| *g < generation) {
            let old: Vec<Reporter> =
                self.reporters.keys().filter(|r| r.0 == node).copied().collect();
            for r in old {
                self.drop_reporter(r, now_ms, &mut t);
            }
        }
        self.generations.insert(node, generation);
        if let Some(snapshot) = snapshot {
            if snapshot.live.iter().copied().eq(live.nodes.keys().copied()) {
                let keep: HashSet<&str> =
                    snapshot.reports.iter().filter(|r| r.online).map(|r| r.user.as_str()).collect();
                let old: Vec<Arc<str>> = self
                    .reporters
                    .get(&reporter)
                    .map(|users| users.iter().filter(|u| !keep.contains(&***u)).cloned().collect())
                    .unwrap_or_default();
                for user in old {
                    self.remove(&user, reporter, now_ms, &mut t);
                }
            }
            self.apply(reporter, snapshot.reports, &mut t);
        }
        self.apply(reporter, reports, &mut t);
        self.changes(t, is_home, now_ms)
    }

    /// Drops the entries of reporters whose node `live` no longer counts (dead, leaving,
    /// restarted) or that gossip has not seen live for [`UNKNOWN_GRACE_MS`], and silently
    /// those of users no longer homed here (their new home node receives snapshots and
    /// decides). Returns the changes of users homed here, including users online here who
    /// were homed elsewhere per `was_home` (this node announces them now).
    pub fn retain(
        &mut self,
        live: &Live,
        is_home: impl Fn(&str) -> bool,
        was_home: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> Vec<wire::Changed> {
        let mut t = Touched::default();
        let nodes: HashSet<NodeId> = self.reporters.keys().map(|r| r.0).collect();
        self.unknown.retain(|n, _| nodes.contains(n) && !live.nodes.contains_key(n));
        for n in nodes {
            if !live.nodes.contains_key(&n) && !live.down.contains_key(&n) {
                self.unknown.entry(n).or_insert(now_ms);
            }
        }
        let gone: Vec<Reporter> = self
            .reporters
            .keys()
            .filter(|(node, _)| {
                let generation = self.generations.get(node).copied().unwrap_or_default();
                !live.counts(*node, generation)
                    || self
                        .unknown
                        .get(node)
                        .is_some_and(|since| now_ms.saturating_sub(*since) >= UNKNOWN_GRACE_MS)
            })
            .copied()
            .collect();
        for r in gone {
            self.drop_reporter(r, now_ms, &mut t);
        }
        let reporters = &self.reporters;
        self.unknown.retain(|n, _| reporters.keys().any(|r| r.0 == *n));
        for user in self.online.keys().filter(|u| is_home(u) && !was_home(u)) {
            t.before.entry(user.clone()).or_insert(None);
        }
        let moved: Vec<Arc<str>> = self.online.keys().filter(|u| !is_home(u)).cloned().collect();
        for user in moved {
            if let Some(entries) = self.online.remove(&user) {
                for e in entries {
                    if let Some(users) = self.reporters.get_mut(&e.reporter) {
                        users.remove(&user);
                    }
                }
            }
        }
        self.changes(t, is_home, now_ms)
    }

    /// The presence of `user`; `None` when the aggregator knows nothing of it.
    #[must_use]
    pub fn current(&self, user: &str) -> Option<Presence> {
        if let Some(entries) = self.online.get(user) {
            return Some(online(user, entries));
        }
        self.last_seen.get(user).map(|last_seen_ms| offline(user, last_seen_ms))
    }

    /// Users online per this aggregator.
    #[must_use]
    pub fn online_users(&self) -> usize {
        self.online.len()
    }

    /// Every user homed here (per `is_home`) online per this aggregator, as changes (for
    /// [`Watch::sync`]).
    #[must_use]
    pub fn all_online(&self, is_home: impl Fn(&str) -> bool) -> Vec<wire::Changed> {
        self.online
            .iter()
            .filter(|(user, _)| is_home(user))
            .map(|(user, entries)| wire::Changed {
                presence: Some(online(user, entries)),
                nodes: nodes_of(entries),
            })
            .collect()
    }

    fn touch(&self, user: &Arc<str>, t: &mut Touched) {
        t.before.entry(user.clone()).or_insert_with(|| self.online.get(user).map(|e| nodes_of(e)));
    }

    fn apply(&mut self, reporter: Reporter, reports: Vec<wire::Report>, t: &mut Touched) {
        for r in reports {
            let user: Arc<str> = Arc::from(r.user.as_str());
            if !r.online {
                self.remove(&user, reporter, r.at_ms, t);
                continue;
            }
            self.touch(&user, t);
            let entry = Entry { reporter, devices: r.devices, since_ms: r.at_ms };
            let entries = self.online.entry(user.clone()).or_default();
            match entries.iter_mut().find(|e| e.reporter == reporter) {
                Some(e) => *e = entry,
                None => entries.push(entry),
            }
            self.reporters.entry(reporter).or_default().insert(user);
        }
    }

    fn remove(&mut self, user: &Arc<str>, reporter: Reporter, at_ms: u64, t: &mut Touched) {
        self.touch(user, t);
        let ended = t.ended.entry(user.clone()).or_insert(at_ms);
        *ended = (*ended).max(at_ms);
        if let Some(entries) = self.online.get_mut(user) {
            entries.retain(|e| e.reporter != reporter);
            if entries.is_empty() {
                self.online.remove(user);
            }
        }
        if let Some(users) = self.reporters.get_mut(&reporter) {
            users.remove(user);
        }
    }

    fn drop_reporter(&mut self, reporter: Reporter, now_ms: u64, t: &mut Touched) {
        let Some(users) = self.reporters.remove(&reporter) else { return };
        for user in users {
            self.remove(&user, reporter, now_ms, t);
        }
    }

    fn changes(
        &mut self,
        t: Touched,
        is_home: impl Fn(&str) -> bool,
        now_ms: u64,
    ) -> Vec<wire::Changed> {
        let mut out = Vec::new();
        for (user, before) in t.before {
            if !is_home(&user) {
                continue;
            }
            match (before, self.online.get(&user)) {
                (before, Some(entries)) => {
                    let nodes = nodes_of(entries);
                    if before.as_ref() != Some(&nodes) {
                        self.last_seen.invalidate(&user);
                        let presence = Some(online(&user, entries));
                        out.push(wire::Changed { presence, nodes });
                    }
                }
                (Some(_), None) => {
                    let last_seen = t.ended.get(&user).copied().unwrap_or(now_ms);
                    self.last_seen.insert(user.clone(), last_seen);
                    out.push(wire::Changed {
                        presence: Some(offline(&user, last_seen)),
                        nodes: Vec::new(),
                    });
                }
                (None, None) => {}
            }
        }
        out
    }
}

fn online(user: &str, entries: &[Entry]) -> Presence {
    Presence {
        user_id: user.to_owned(),
        online: true,
        devices: entries.iter().map(|e| e.devices).sum(),
        last_seen_ms: entries.iter().map(|e| e.since_ms).min().unwrap_or_default(),
    }
}

fn nodes_of(entries: &[Entry]) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = entries.iter().map(|e| e.reporter.0).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

fn offline(user: &str, last_seen_ms: u64) -> Presence {
    Presence { user_id: user.to_owned(), online: false, devices: 0, last_seen_ms }
}

#[derive(Debug, Clone)]
struct Watched {
    /// The home node and shard that said the user is online.
    home: Reporter,
    /// That home node's generation.
    generation: u64,
    /// The nodes the user is online through.
    nodes: Vec<NodeId>,
}

impl Watched {
    /// Whether the home incarnation that said the user is online is live.
    fn home_alive(&self, live: &Live) -> bool {
        live.holds(self.home.0, self.generation)
    }
}

/// What a node knows of the online users of the cluster, from their home nodes' changes and
/// periodic syncs: it decides which changes are news for the sessions here (a push), and
/// turns users offline whose home node died together with every node they were online
/// through.
#[derive(Debug, Default)]
pub struct Watch {
    online: HashMap<Arc<str>, Watched>,
    /// Users whose home node and nodes all died: offline at the deadline unless a new home
    /// node says otherwise first.
    suspect: HashMap<Arc<str>, u64>,
}

impl Watch {
    /// Whether the user is online on some node, as far as this watch knows.
    #[must_use]
    pub fn is_online(&self, user: &str) -> bool {
        self.online.contains_key(user)
    }

    /// Takes in a change from the user's home (node, shard, in `generation`); returns the
    /// presence to push to the sessions here when the user's online state changed.
    pub fn apply(
        &mut self,
        home: Reporter,
        generation: u64,
        change: &wire::Changed,
    ) -> Option<Presence> {
        let p = change.presence.as_ref()?;
        let user: Arc<str> = Arc::from(p.user_id.as_str());
        let suspect = self.suspect.remove(&user).is_some();
        if p.online {
            let watched = Watched { home, generation, nodes: change.nodes.clone() };
            (self.online.insert(user, watched).is_none() && !suspect).then(|| p.clone())
        } else {
            (self.online.remove(&user).is_some() || suspect).then(|| p.clone())
        }
    }

    /// Takes in every online user homed on `home` (node, shard; the node has `shards`
    /// shards). Listed users are applied. When the sender saw the same live nodes as `live`
    /// (so both agree on homes), users it does not list turn offline (a change was lost) if
    /// it is the home that said they were online, or if that home is gone and the user is
    /// homed on the sender now.
    pub fn sync(
        &mut self,
        home: Reporter,
        generation: u64,
        shards: usize,
        set: &wire::OnlineSet,
        live: &Live,
        now_ms: u64,
    ) -> Vec<Presence> {
        let all = &set.users;
        let mut out: Vec<Presence> =
            all.iter().filter_map(|c| self.apply(home, generation, c)).collect();
        if !set.live.iter().copied().eq(live.nodes.keys().copied()) {
            return out;
        }
        let listed: HashSet<&str> =
            all.iter().filter_map(|c| c.presence.as_ref()).map(|p| p.user_id.as_str()).collect();
        let covers = |user: &str, w: &Watched| {
            w.home == home
                || (!w.home_alive(live)
                    && live.home(user) == home.0
                    && u32::try_from(crate::shard::home_shard(user, shards.max(1))).ok()
                        == Some(home.1))
        };
        self.online.retain(|user, w| {
            let keep = listed.contains(&**user) || !covers(user, w);
            if !keep {
                out.push(offline(user, now_ms));
            }
            keep
        });
        out
    }

    /// Notes users whose home node is no longer live, nor any node they were online
    /// through: unless a new home node says they are online within [`WATCH_GRACE_MS`],
    /// [`Watch::due`] turns them offline (nobody else would say so).
    pub fn gone(&mut self, live: &Live, now_ms: u64) {
        let suspect = &mut self.suspect;
        self.online.retain(|user, w| {
            // A restarted home forgot the user: suspect, whatever the nodes (the new
            // incarnation, or another home, claims users still online within the grace).
            let restarted = live.nodes.get(&w.home.0).is_some_and(|(g, _)| *g > w.generation);
            let keep =
                w.home_alive(live) || (!restarted && w.nodes.iter().any(|n| live.is_live(*n)));
            if !keep {
                suspect.insert(user.clone(), now_ms + WATCH_GRACE_MS);
            }
            keep
        });
    }

    /// Suspects whose deadline passed: offline, last seen when they were suspected.
    pub fn due(&mut self, now_ms: u64) -> Vec<Presence> {
        if self.suspect.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        self.suspect.retain(|user, due| {
            let keep = *due > now_ms;
            if !keep {
                out.push(offline(user, due.saturating_sub(WATCH_GRACE_MS)));
            }
            keep
        });
        out
    }
}

/// A batch from another node, for one home shard here: the parts of it about users homed on
/// that shard.
#[derive(Debug)]
pub struct Incoming {
    /// Who sent it, and its place in the sender's order.
    pub origin: Origin,
    /// The sender's shard count.
    pub shards: usize,
    /// The snapshot's part (an empty part clears what the shard held from the sender).
    pub snapshot: Option<wire::Snapshot>,
    /// Reports after the snapshot.
    pub reports: Vec<wire::Report>,
    /// Changes from the users' home.
    pub changed: Vec<wire::Changed>,
    /// The sender's online users (a sync), if one came.
    pub online: Option<wire::OnlineSet>,
}

/// Splits items by the home shard (here) of their user.
fn split<T>(items: Vec<T>, n: usize, user: fn(&T) -> Option<&str>) -> Vec<Vec<T>> {
    let mut parts: Vec<Vec<T>> = (0..n).map(|_| Vec::new()).collect();
    for item in items {
        let Some(u) = user(&item).filter(|u| switchboard_protocol::validate::user_id(u).is_ok())
        else {
            continue;
        };
        if let Some(part) = parts.get_mut(home_shard(u, n)) {
            part.push(item);
        }
    }
    parts
}

fn report_user(r: &wire::Report) -> Option<&str> {
    Some(r.user.as_str())
}

fn changed_user(c: &wire::Changed) -> Option<&str> {
    c.presence.as_ref().map(|p| p.user_id.as_str())
}

/// Hands a batch from another node to this node's home shards, one message per shard (every
/// shard when it holds a snapshot or an online set, whose empty parts count too). `false` when
/// the batch does not decode.
pub async fn serve_batch(shards: &[mpsc::Sender<ShardMsg>], body: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(batch) = wire::Batch::decode(body) else { return false };
    let n = shards.len();
    let origin =
        Origin { from: (batch.node, batch.shard), generation: batch.generation, seq: batch.seq };
    let everyone = batch.snapshot.is_some() || batch.online.is_some();
    let mut snapshot = batch.snapshot.map(|s| {
        let live = s.live;
        split(s.reports, n, report_user)
            .into_iter()
            .map(move |reports| wire::Snapshot { reports, live: live.clone() })
    });
    let mut online = batch.online.map(|o| {
        let live = o.live;
        split(o.users, n, changed_user)
            .into_iter()
            .map(move |users| wire::OnlineSet { users, live: live.clone() })
    });
    let reports = split(batch.reports, n, report_user);
    let changed = split(batch.changed, n, changed_user);
    for ((tx, reports), changed) in shards.iter().zip(reports).zip(changed) {
        let part = Incoming {
            origin,
            shards: usize::try_from(batch.shards).unwrap_or(1),
            snapshot: snapshot.as_mut().and_then(Iterator::next),
            reports,
            changed,
            online: online.as_mut().and_then(Iterator::next),
        };
        if everyone || !part.reports.is_empty() || !part.changed.is_empty() {
            let _ = tx.send(ShardMsg::Home(HomeMsg::Presence(Box::new(part)))).await;
        }
    }
    true
}

/// Answers another node's query for users homed here, from the home shards' aggregates and,
/// for users they know nothing of, the store. `None` when the query does not decode.
pub async fn serve_query(
    shards: &[mpsc::Sender<ShardMsg>],
    storage: Arc<Storage>,
    body: &[u8],
) -> Option<Vec<u8>> {
    use prost::Message as _;
    let query = wire::Query::decode(body).ok()?;
    let mut users: Vec<Arc<str>> = Vec::with_capacity(query.users.len());
    for u in query.users.into_iter().take(MAX_QUERY) {
        if switchboard_protocol::validate::user_id(&u).is_ok() {
            users.push(Arc::from(u.as_str()));
        }
    }
    let mut waits = Vec::new();
    for (home, group) in crate::shard::group_by_home(users.iter().cloned(), shards.len()) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if let Some(tx) = shards.get(home) {
            let msg = HomeMsg::PresenceQuery { users: group.clone(), reply };
            let _ = tx.send(ShardMsg::Home(msg)).await;
        }
        waits.push(async move { (group, rx.await.unwrap_or_default()) });
    }
    let mut presences = Vec::with_capacity(users.len());
    let mut missing = Vec::new();
    for (group, answers) in futures::future::join_all(waits).await {
        let mut answers = answers.into_iter();
        for user in group {
            match answers.next().flatten() {
                Some(p) => presences.push(p),
                None => missing.push(user),
            }
        }
    }
    presences.extend(crate::shard::home::stored_presence(storage, missing).await);
    Some(switchboard_protocol::PresenceList { presences }.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(user: &str, devices: u32, at_ms: u64) -> wire::Report {
        wire::Report { user: user.into(), online: true, devices, at_ms }
    }

    fn off(user: &str, at_ms: u64) -> wire::Report {
        wire::Report { user: user.into(), online: false, devices: 0, at_ms }
    }

    fn flips(changes: &[wire::Changed]) -> Vec<(String, bool, u32, u64)> {
        let mut v: Vec<_> = changes
            .iter()
            .filter_map(|c| c.presence.as_ref())
            .map(|p| (p.user_id.clone(), p.online, p.devices, p.last_seen_ms))
            .collect();
        v.sort();
        v
    }

    fn live(nodes: &[(NodeId, u64)]) -> Live {
        Live {
            me: 1,
            generation: 1,
            nodes: nodes.iter().map(|(n, g)| (*n, (*g, None))).collect(),
            down: BTreeMap::new(),
        }
    }

    /// Nodes 1–3 live in generation 1; every user homed here.
    fn all() -> Live {
        live(&[(1, 1), (2, 1), (3, 1)])
    }

    fn report(
        a: &mut Aggregator,
        r: Reporter,
        generation: u64,
        snapshot: Option<Vec<wire::Report>>,
        reports: Vec<wire::Report>,
        now: u64,
    ) -> Vec<wire::Changed> {
        let snapshot = snapshot.map(|reports| wire::Snapshot { reports, live: vec![1, 2, 3] });
        a.report(r, generation, snapshot, reports, &all(), |_| true, now)
    }

    #[test]
    fn given_devices_on_two_nodes_should_sum_them_and_flip_only_when_the_last_goes() {
        let mut a = Aggregator::default();
        let c = report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 100)], 150);
        assert_eq!(flips(&c), [("alice".into(), true, 1, 100)]);
        // A second node: no flip, but the nodes she is online through changed.
        let c = report(&mut a, (3, 1), 1, None, vec![on("alice", 2, 120)], 160);
        assert_eq!(c.iter().map(|c| c.nodes.clone()).collect::<Vec<_>>(), [vec![2, 3]]);
        let p = a.current("alice").expect("known");
        assert_eq!((p.online, p.devices, p.last_seen_ms), (true, 3, 100));
        // A device count change alone is no change.
        assert!(report(&mut a, (3, 1), 1, None, vec![on("alice", 1, 120)], 170).is_empty());
        let c = report(&mut a, (2, 0), 1, None, vec![off("alice", 200)], 200);
        assert_eq!(c[0].nodes, [3]);
        let c = report(&mut a, (3, 1), 1, None, vec![off("alice", 300)], 310);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 300)]);
        assert_eq!(a.current("alice").map(|p| p.last_seen_ms), Some(300));
        assert_eq!(a.online_users(), 0);
        report(&mut a, (3, 1), 1, None, vec![on("bob", 1, 400)], 400);
        let every = a.all_online(|_| true);
        assert_eq!(flips(&every), [("bob".into(), true, 1, 400)]);
        assert_eq!(every[0].nodes, [3]);
    }

    #[test]
    fn given_a_snapshot_should_replace_what_that_reporter_said_before() {
        let mut a = Aggregator::default();
        report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1), on("bob", 1, 1)], 10);
        report(&mut a, (3, 0), 1, None, vec![on("bob", 1, 1)], 10);
        // The report of alice going offline was lost; the next snapshot no longer lists her.
        let c =
            report(&mut a, (2, 0), 1, Some(vec![on("bob", 2, 1), on("carol", 1, 5)]), vec![], 20);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 20), ("carol".into(), true, 1, 5)]);
        assert_eq!(a.current("bob").map(|p| p.devices), Some(3));
        // An empty snapshot clears the reporter; bob stays online through node 3.
        let c = report(&mut a, (2, 0), 1, Some(vec![]), vec![], 30);
        assert_eq!(flips(&c), [("bob".into(), true, 1, 1), ("carol".into(), false, 0, 30)]);
        assert_eq!(a.current("bob").map(|p| (p.online, p.devices)), Some((true, 1)));
        // A snapshot taken with other live nodes in view (a home may have moved) leaves out
        // users it thinks are homed elsewhere: it removes nothing, only adds.
        report(&mut a, (2, 0), 1, None, vec![on("dan", 1, 1)], 40);
        let other = wire::Snapshot { reports: vec![on("eve", 1, 2)], live: vec![1, 2, 3, 4] };
        let c = a.report((2, 0), 1, Some(other), vec![], &all(), |_| true, 50);
        assert_eq!(flips(&c), [("eve".into(), true, 1, 2)]);
        assert_eq!(a.current("dan").map(|p| p.online), Some(true));
    }

    #[test]
    fn given_a_dead_or_restarted_node_should_drop_its_entries_and_keep_others() {
        let mut a = Aggregator::default();
        report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1), on("bob", 1, 1)], 10);
        report(&mut a, (2, 1), 1, None, vec![on("dave", 1, 1)], 10);
        report(&mut a, (3, 0), 1, None, vec![on("bob", 1, 1)], 10);
        assert!(a.retain(&all(), |_| true, |_| true, 20).is_empty());
        // Node 2 restarted: gossip shows generation 2, so generation 1's entries go at once.
        let restarted = live(&[(1, 1), (2, 2), (3, 1)]).after(&all());
        let c = a.retain(&restarted, |_| true, |_| true, 30);
        let c: Vec<_> = flips(&c).into_iter().filter(|f| !f.1).collect();
        assert_eq!(c, [("alice".into(), false, 0, 30), ("dave".into(), false, 0, 30)]);
        assert_eq!(a.current("bob").map(|p| p.online), Some(true));
        // Node 3 died.
        let c = a.retain(&live(&[(1, 1), (2, 2)]).after(&restarted), |_| true, |_| true, 40);
        assert_eq!(flips(&c), [("bob".into(), false, 0, 40)]);
    }

    #[test]
    fn given_reports_of_a_node_gossip_never_saw_live_should_keep_them_only_for_a_while() {
        let mut a = Aggregator::default();
        // Node 4 reports before this node's gossip has seen it live.
        report(&mut a, (4, 0), 1, None, vec![on("alice", 1, 1)], 10);
        assert!(a.retain(&all(), |_| true, |_| true, 20).is_empty(), "kept while unknown");
        let c = a.retain(&all(), |_| true, |_| true, 20 + UNKNOWN_GRACE_MS);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 20 + UNKNOWN_GRACE_MS)]);
        // Seen live in time: kept.
        report(&mut a, (4, 0), 1, None, vec![on("bob", 1, 1)], 100_000);
        a.retain(&all(), |_| true, |_| true, 100_000);
        let four = live(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
        assert!(a.retain(&four, |_| true, |_| true, 200_000).is_empty());
        assert_eq!(a.current("bob").map(|p| p.online), Some(true));
    }

    #[test]
    fn given_users_whose_home_moved_here_should_announce_them_and_list_only_home_users() {
        let mut a = Aggregator::default();
        // Taken in while another node was carol's home: nothing announced.
        let c = a.report((2, 0), 1, None, vec![on("carol", 1, 7)], &all(), |_| false, 10);
        assert!(c.is_empty());
        assert!(a.all_online(|u| u != "carol").is_empty(), "not homed here: not listed");
        // That node died and carol is homed here now.
        let c = a.retain(&all(), |_| true, |_| false, 20);
        assert_eq!(flips(&c), [("carol".into(), true, 1, 7)]);
    }

    #[test]
    fn given_a_late_report_of_a_dead_node_or_an_older_generation_should_ignore_it() {
        let mut a = Aggregator::default();
        report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1)], 10);
        let mut dead = live(&[(1, 1), (3, 1)]);
        dead.down.insert(2, 1);
        a.retain(&dead, |_| true, |_| true, 20);
        let late = a.report((2, 0), 1, None, vec![on("alice", 1, 1)], &dead, |_| true, 30);
        assert!(late.is_empty(), "a dead node's late report revived alice");
        // The node restarted (generation 2) and its empty snapshot came; then a late batch of
        // generation 1.
        report(&mut a, (2, 0), 2, Some(vec![]), vec![], 40);
        assert!(report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1)], 50).is_empty());
        assert_eq!(a.current("alice").map(|p| p.online), Some(false));
    }

    #[test]
    fn given_reports_of_a_newer_generation_than_gossip_knows_should_keep_them() {
        let mut a = Aggregator::default();
        report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1)], 10);
        // The restarted node reports before gossip tells of its new generation.
        let c = report(&mut a, (2, 0), 2, None, vec![on("bob", 1, 15)], 20);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 20), ("bob".into(), true, 1, 15)]);
        assert!(a.retain(&all(), |_| true, |_| true, 25).is_empty(), "gossip is behind");
        assert_eq!(a.current("bob").map(|p| p.online), Some(true));
    }

    #[test]
    fn given_users_whose_home_moved_away_should_drop_them_without_a_change() {
        let mut a = Aggregator::default();
        report(&mut a, (2, 0), 1, None, vec![on("alice", 1, 1), on("bob", 1, 1)], 10);
        // Alice's home is now another node: no "offline" from here, and no entry left.
        let c = a.retain(&all(), |u| u != "alice", |_| true, 20);
        assert!(c.is_empty(), "{c:?}");
        assert!(a.current("alice").is_none_or(|p| !p.online));
        // Reports about her still count for nobody here.
        let c = a.report((3, 0), 1, None, vec![on("alice", 1, 1)], &all(), |u| u != "alice", 30);
        assert!(c.is_empty());
    }

    #[test]
    fn given_a_watch_should_push_only_news_and_repair_missed_changes_by_sync() {
        let mut w = Watch::default();
        let changed = |user: &str, online: bool, nodes: Vec<NodeId>| wire::Changed {
            presence: Some(Presence { user_id: user.into(), online, ..Presence::default() }),
            nodes,
        };
        let l = all();
        let set = |users: Vec<wire::Changed>, live: &[NodeId]| wire::OnlineSet {
            users,
            live: live.to_vec(),
        };
        let alice = "alice";
        let h = (l.home(alice), u32::try_from(crate::shard::home_shard(alice, 2)).expect("u32"));
        assert!(w.apply(h, 1, &changed(alice, true, vec![2])).is_some(), "news");
        assert!(w.apply(h, 1, &changed(alice, true, vec![2, 3])).is_none(), "same state");
        assert!(w.apply(h, 1, &changed(alice, false, vec![])).is_some());
        assert!(w.apply(h, 1, &changed(alice, false, vec![])).is_none(), "no duplicate");
        // The offline change was lost: the next sync from her home repairs it, but only
        // when the sender saw the same live nodes (else homes may differ).
        w.apply(h, 1, &changed(alice, true, vec![2]));
        assert!(w.sync(h, 1, 2, &set(vec![], &[1, 2]), &l, 99).is_empty(), "other views");
        let p = w.sync(h, 1, 2, &set(vec![], &[1, 2, 3]), &l, 99);
        let p: Vec<_> = p.iter().map(|p| (p.user_id.as_str(), p.online)).collect();
        assert_eq!(p, [(alice, false)]);
        // Another node's sync does not speak for her while her home is live.
        w.apply(h, 1, &changed(alice, true, vec![2]));
        let other = if h.0 == 1 { (2, 0) } else { (1, 0) };
        assert!(w.sync(other, 1, 2, &set(vec![], &[1, 2, 3]), &l, 99).is_empty());
        // A sync lists a user this node had not heard of: news.
        let p = w.sync(other, 1, 2, &set(vec![changed("bob", true, vec![1])], &[1, 2, 3]), &l, 99);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn given_a_users_home_and_every_node_of_theirs_dead_should_report_them_gone() {
        let mut w = Watch::default();
        let changed = |user: &str, nodes: Vec<NodeId>| wire::Changed {
            presence: Some(Presence { user_id: user.into(), online: true, ..Presence::default() }),
            nodes,
        };
        w.apply((3, 0), 1, &changed("alice", vec![2, 3]));
        w.apply((3, 0), 1, &changed("bob", vec![3]));
        w.apply((1, 0), 1, &changed("carol", vec![3]));
        w.apply((3, 0), 1, &changed("dora", vec![3]));
        // Node 3 died: bob's and dora's homes went with their only node; alice is still on
        // node 2, and carol's home (node 1) will say so itself.
        w.gone(&live(&[(1, 1), (2, 1)]), 50);
        w.gone(&live(&[(1, 1), (2, 1)]), 60);
        // Dora's new home says she is online (on a node this node had not heard of): no push.
        assert!(w.apply((1, 0), 1, &changed("dora", vec![1])).is_none());
        assert!(w.due(50 + WATCH_GRACE_MS - 1).is_empty(), "not yet");
        let due = w.due(50 + WATCH_GRACE_MS);
        let due: Vec<_> =
            due.iter().map(|p| (p.user_id.as_str(), p.online, p.last_seen_ms)).collect();
        assert_eq!(due, [("bob", false, 50)], "once");
        assert!(w.due(u64::MAX).is_empty());
        // A home that restarted forgot its users: suspected even though a node of theirs is
        // live, unless the new incarnation claims them.
        w.apply((2, 0), 1, &changed("erin", vec![1, 2]));
        w.apply((2, 0), 1, &changed("finn", vec![1]));
        w.gone(&live(&[(1, 1), (2, 2)]), 100);
        assert!(w.apply((2, 0), 2, &changed("finn", vec![1])).is_none(), "claimed");
        let due = w.due(100 + WATCH_GRACE_MS);
        assert_eq!(due.iter().map(|p| p.user_id.as_str()).collect::<Vec<_>>(), ["erin"]);
    }

    #[test]
    fn given_batches_out_of_order_should_take_only_newer_ones() {
        let mut o = Order::default();
        let at = |generation, seq| Origin { from: (2, 0), generation, seq };
        assert!(o.fresh(at(1, 1)));
        assert!(o.fresh(at(1, 3)));
        assert!(!o.fresh(at(1, 2)), "late");
        assert!(!o.fresh(at(1, 3)), "again");
        assert!(o.fresh(at(2, 1)), "a restart starts over");
        assert!(!o.fresh(at(1, 9)), "older generation");
        let other_shard = Origin { from: (2, 5), generation: 1, seq: 1 };
        assert!(!o.fresh(other_shard), "older generation, from a shard never heard of");
    }

    #[test]
    fn given_gossip_should_count_live_and_unknown_nodes_but_not_dead_ones() {
        let mut l = live(&[(1, 1), (2, 3)]);
        l.down.insert(4, 2);
        assert!(l.counts(2, 3) && l.counts(2, 4) && !l.counts(2, 2));
        assert!(!l.counts(4, 2) && l.counts(4, 3), "dead, unless restarted since");
        assert!(l.counts(5, 1), "not heard of yet");
        let before = live(&[(1, 1), (2, 2)]);
        assert_eq!(l.came(&before).collect::<Vec<_>>(), [2]);
        // Node 2 drops out of view (dead): it joins `down` with the generation it had.
        let next = live(&[(1, 1)]).after(&l);
        assert_eq!(next.down, BTreeMap::from([(2, 3), (4, 2)]));
        assert!(!next.counts(2, 3));
        // Back with a new generation: live again, no longer down.
        let back = live(&[(1, 1), (2, 4)]).after(&next);
        assert_eq!(back.down, BTreeMap::from([(4, 2)]));
    }

    #[test]
    fn given_live_nodes_should_agree_on_one_home_per_user_and_spread_users() {
        let nodes = [1, 2, 3];
        let mut per: BTreeMap<NodeId, usize> = BTreeMap::new();
        for i in 0..3000 {
            let user = format!("user{i}");
            let home = home_node(&user, nodes).expect("a node");
            assert_eq!(Some(home), home_node(&user, [3, 1, 2]), "order does not matter");
            *per.entry(home).or_default() += 1;
            // Removing another node never moves a user.
            let other = nodes.iter().copied().find(|n| *n != home).expect("another");
            let rest = nodes.iter().copied().filter(|n| *n != other);
            assert_eq!(home_node(&user, rest), Some(home));
        }
        assert!(per.values().all(|n| *n > 800), "{per:?}");
    }
}
