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
    /// the reports, the changes.
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

/// The live nodes as gossip sees them: generation and peer address per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// This node.
    pub me: NodeId,
    /// Its generation.
    pub generation: u64,
    /// Live nodes (this one included), with their generation and peer address.
    pub nodes: BTreeMap<NodeId, (u64, Option<SocketAddr>)>,
}

impl Live {
    /// Only this node (before gossip has said anything).
    #[must_use]
    pub fn alone(me: NodeId, generation: u64) -> Self {
        Self { me, generation, nodes: BTreeMap::from([(me, (generation, None))]) }
    }

    /// The live, not leaving, members of `view`, and this node in any case.
    #[must_use]
    pub fn of(view: &View) -> Self {
        let mut live = Self::alone(view.self_id, view.generation);
        for m in view.members.iter().filter(|m| m.live && !m.leaving && m.id != view.self_id) {
            live.nodes.insert(m.id, (m.generation, Some(m.gossip)));
        }
        live
    }

    /// The home node of `user`.
    #[must_use]
    pub fn home(&self, user: &str) -> NodeId {
        home_node(user, self.nodes.keys().copied()).unwrap_or(self.me)
    }

    /// Whether reports of `node` in `generation` still count: the node is live and gossip
    /// knows no newer generation of it (a report may outrun gossip's news of a restart).
    #[must_use]
    pub fn counts(&self, node: NodeId, generation: u64) -> bool {
        self.nodes.get(&node).is_some_and(|(g, _)| *g <= generation)
    }

    /// The other live nodes.
    pub fn others(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied().filter(move |n| *n != self.me)
    }
}

/// A local presence change or snapshot to send, or a change to broadcast.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// A change of one user's local presence, for the user's home node.
    Report(wire::Report),
    /// Every local user homed on the receiving node.
    Snapshot(Vec<wire::Report>),
    /// A change of a user homed here, for every other node.
    Changed(wire::Changed),
}

/// A reporter: a node and its shard.
pub type Reporter = (NodeId, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    reporter: Reporter,
    devices: u32,
    since_ms: u64,
}

/// The home node's view of its users: who reports them online where.
pub struct Aggregator {
    online: HashMap<Arc<str>, Vec<Entry>>,
    reporters: HashMap<Reporter, (u64, HashSet<Arc<str>>)>,
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
            last_seen: moka::sync::Cache::builder()
                .max_capacity(LAST_SEEN_CAPACITY)
                .time_to_live(LAST_SEEN_TTL)
                .build(),
        }
    }
}

/// What changed while applying reports: each touched user's state before, and the latest
/// last-seen time reported for it.
#[derive(Default)]
struct Touched {
    before: HashMap<Arc<str>, bool>,
    ended: HashMap<Arc<str>, u64>,
}

impl Aggregator {
    /// Applies what `reporter` (in `generation`) sent: a snapshot replaces everything it
    /// reported before, then each report in order. Returns the users whose online state
    /// flipped. Reports of an older generation than one already seen are ignored; a newer one
    /// drops the older's entries first.
    pub fn report(
        &mut self,
        reporter: Reporter,
        generation: u64,
        snapshot: Option<Vec<wire::Report>>,
        reports: Vec<wire::Report>,
        now_ms: u64,
    ) -> Vec<wire::Changed> {
        let mut t = Touched::default();
        match self.reporters.get(&reporter) {
            Some((g, _)) if *g > generation => return Vec::new(),
            Some((g, _)) if *g < generation => self.drop_reporter(reporter, now_ms, &mut t),
            _ => {}
        }
        if let Some(snapshot) = snapshot {
            let keep: HashSet<&str> =
                snapshot.iter().filter(|r| r.online).map(|r| r.user.as_str()).collect();
            let old: Vec<Arc<str>> = self
                .reporters
                .get(&reporter)
                .map(|(_, users)| users.iter().filter(|u| !keep.contains(&***u)).cloned().collect())
                .unwrap_or_default();
            for user in old {
                self.remove(&user, reporter, now_ms, &mut t);
            }
            self.apply(reporter, generation, snapshot, &mut t);
        }
        self.apply(reporter, generation, reports, &mut t);
        self.changes(t, now_ms)
    }

    /// Drops the entries of reporters whose node `live` no longer counts.
    pub fn retain(&mut self, live: &Live, now_ms: u64) -> Vec<wire::Changed> {
        let mut t = Touched::default();
        let gone: Vec<Reporter> = self
            .reporters
            .iter()
            .filter(|((node, _), (g, _))| !live.counts(*node, *g))
            .map(|(r, _)| *r)
            .collect();
        for r in gone {
            self.drop_reporter(r, now_ms, &mut t);
        }
        self.changes(t, now_ms)
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

    /// Every user online per this aggregator, as changes (for a node that just became live).
    #[must_use]
    pub fn all_online(&self) -> Vec<wire::Changed> {
        self.online
            .iter()
            .map(|(user, entries)| wire::Changed {
                presence: Some(online(user, entries)),
                nodes: nodes_of(entries),
            })
            .collect()
    }

    fn apply(
        &mut self,
        reporter: Reporter,
        generation: u64,
        reports: Vec<wire::Report>,
        t: &mut Touched,
    ) {
        for r in reports {
            let user: Arc<str> = Arc::from(r.user.as_str());
            if !r.online {
                self.remove(&user, reporter, r.at_ms, t);
                continue;
            }
            t.before.entry(user.clone()).or_insert_with(|| self.online.contains_key(&user));
            let entry = Entry { reporter, devices: r.devices, since_ms: r.at_ms };
            let entries = self.online.entry(user.clone()).or_default();
            match entries.iter_mut().find(|e| e.reporter == reporter) {
                Some(e) => *e = entry,
                None => entries.push(entry),
            }
            let users = &mut self
                .reporters
                .entry(reporter)
                .or_insert_with(|| (generation, HashSet::new()))
                .1;
            users.insert(user);
        }
    }

    fn remove(&mut self, user: &Arc<str>, reporter: Reporter, at_ms: u64, t: &mut Touched) {
        t.before.entry(user.clone()).or_insert_with(|| self.online.contains_key(user));
        let ended = t.ended.entry(user.clone()).or_insert(at_ms);
        *ended = (*ended).max(at_ms);
        if let Some(entries) = self.online.get_mut(user) {
            entries.retain(|e| e.reporter != reporter);
            if entries.is_empty() {
                self.online.remove(user);
            }
        }
        if let Some((_, users)) = self.reporters.get_mut(&reporter) {
            users.remove(user);
        }
    }

    fn drop_reporter(&mut self, reporter: Reporter, now_ms: u64, t: &mut Touched) {
        let Some((_, users)) = self.reporters.remove(&reporter) else { return };
        for user in users {
            self.remove(&user, reporter, now_ms, t);
        }
    }

    fn changes(&mut self, t: Touched, now_ms: u64) -> Vec<wire::Changed> {
        let mut out = Vec::new();
        for (user, was) in t.before {
            match (was, self.online.get(&user)) {
                (false, Some(entries)) => {
                    self.last_seen.invalidate(&user);
                    let presence = Some(online(&user, entries));
                    out.push(wire::Changed { presence, nodes: nodes_of(entries) });
                }
                (true, None) => {
                    let last_seen = t.ended.get(&user).copied().unwrap_or(now_ms);
                    self.last_seen.insert(user.clone(), last_seen);
                    out.push(wire::Changed {
                        presence: Some(offline(&user, last_seen)),
                        nodes: Vec::new(),
                    });
                }
                _ => {}
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

/// Through which nodes each user is online, as the changes a node received say.
#[derive(Debug, Default)]
pub struct Watch {
    online: HashMap<Arc<str>, Vec<NodeId>>,
}

impl Watch {
    /// Notes a change.
    pub fn note(&mut self, user: &Arc<str>, change: &wire::Changed) {
        if change.presence.as_ref().is_some_and(|p| p.online) && !change.nodes.is_empty() {
            self.online.insert(user.clone(), change.nodes.clone());
        } else {
            self.online.remove(user);
        }
    }

    /// Users seen online only through nodes that are no longer live; forgotten.
    pub fn gone(&mut self, live: &Live) -> Vec<Arc<str>> {
        let mut gone = Vec::new();
        self.online.retain(|user, nodes| {
            let keep = nodes.iter().any(|n| live.nodes.contains_key(n));
            if !keep {
                gone.push(user.clone());
            }
            keep
        });
        gone
    }
}

/// Hands a batch from another node to this node's home shards, in order: snapshot parts to
/// every shard (an empty part clears what that shard held from the reporter), then reports,
/// then changes. `false` when the batch does not decode.
pub async fn serve_batch(shards: &[mpsc::Sender<ShardMsg>], body: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(batch) = wire::Batch::decode(body) else { return false };
    let n = shards.len();
    let split = |reports: Vec<wire::Report>| {
        let mut parts: Vec<Vec<wire::Report>> = (0..n).map(|_| Vec::new()).collect();
        for r in reports {
            if let Some(part) = parts.get_mut(home_shard(&r.user, n)) {
                part.push(r);
            }
        }
        parts
    };
    let reporter = (batch.node, batch.shard);
    let mut snapshot = batch.snapshot.map(|s| split(s.reports).into_iter());
    let mut changes: Vec<Vec<wire::Changed>> = (0..n).map(|_| Vec::new()).collect();
    for c in batch.changed {
        let Some(p) = &c.presence else { continue };
        if let Some(part) = changes.get_mut(home_shard(&p.user_id, n)) {
            part.push(c);
        }
    }
    for ((tx, reports), changes) in shards.iter().zip(split(batch.reports)).zip(changes) {
        let snapshot = snapshot.as_mut().and_then(Iterator::next);
        if snapshot.is_some() || !reports.is_empty() {
            let msg = HomeMsg::PresenceReports {
                reporter,
                generation: batch.generation,
                snapshot,
                reports,
            };
            let _ = tx.send(ShardMsg::Home(msg)).await;
        }
        if !changes.is_empty() {
            let _ = tx.send(ShardMsg::Home(HomeMsg::PresenceChanged { changes })).await;
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
    presences.extend(crate::net::handler::presence::stored(storage, missing).await);
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
        Live { me: 1, generation: 1, nodes: nodes.iter().map(|(n, g)| (*n, (*g, None))).collect() }
    }

    #[test]
    fn given_devices_on_two_nodes_should_sum_them_and_flip_only_when_the_last_goes() {
        let mut a = Aggregator::default();
        let c = a.report((2, 0), 1, None, vec![on("alice", 1, 100)], 150);
        assert_eq!(flips(&c), [("alice".into(), true, 1, 100)]);
        assert!(a.report((3, 1), 1, None, vec![on("alice", 2, 120)], 160).is_empty());
        let p = a.current("alice").expect("known");
        assert_eq!((p.online, p.devices, p.last_seen_ms), (true, 3, 100));
        assert!(a.report((2, 0), 1, None, vec![off("alice", 200)], 200).is_empty());
        let c = a.report((3, 1), 1, None, vec![off("alice", 300)], 310);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 300)]);
        assert_eq!(a.current("alice").map(|p| p.last_seen_ms), Some(300));
        assert_eq!(a.online_users(), 0);
        a.report((3, 1), 1, None, vec![on("bob", 1, 400)], 400);
        let all = a.all_online();
        assert_eq!(flips(&all), [("bob".into(), true, 1, 400)]);
        assert_eq!(all[0].nodes, [3]);
    }

    #[test]
    fn given_a_snapshot_should_replace_what_that_reporter_said_before() {
        let mut a = Aggregator::default();
        a.report((2, 0), 1, None, vec![on("alice", 1, 1), on("bob", 1, 1)], 10);
        a.report((3, 0), 1, None, vec![on("bob", 1, 1)], 10);
        // The report of alice going offline was lost; the next snapshot no longer lists her.
        let c = a.report((2, 0), 1, Some(vec![on("bob", 2, 1), on("carol", 1, 5)]), vec![], 20);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 20), ("carol".into(), true, 1, 5)]);
        assert_eq!(a.current("bob").map(|p| p.devices), Some(3));
        // An empty snapshot clears the reporter; bob stays online through node 3.
        let c = a.report((2, 0), 1, Some(vec![]), vec![], 30);
        assert_eq!(flips(&c), [("carol".into(), false, 0, 30)]);
        assert_eq!(a.current("bob").map(|p| (p.online, p.devices)), Some((true, 1)));
    }

    #[test]
    fn given_a_dead_or_restarted_node_should_drop_its_entries_and_keep_others() {
        let mut a = Aggregator::default();
        a.report((2, 0), 1, None, vec![on("alice", 1, 1), on("bob", 1, 1)], 10);
        a.report((2, 1), 1, None, vec![on("dave", 1, 1)], 10);
        a.report((3, 0), 1, None, vec![on("bob", 1, 1)], 10);
        assert!(a.retain(&live(&[(1, 1), (2, 1), (3, 1)]), 20).is_empty());
        // Node 2 restarted: gossip shows generation 2, so generation 1's entries go at once.
        let c = a.retain(&live(&[(1, 1), (2, 2), (3, 1)]), 30);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 30), ("dave".into(), false, 0, 30)]);
        assert_eq!(a.current("bob").map(|p| p.online), Some(true));
        // Node 3 died.
        let c = a.retain(&live(&[(1, 1), (2, 2)]), 40);
        assert_eq!(flips(&c), [("bob".into(), false, 0, 40)]);
    }

    #[test]
    fn given_reports_of_a_newer_generation_than_gossip_knows_should_keep_them() {
        let mut a = Aggregator::default();
        a.report((2, 0), 1, None, vec![on("alice", 1, 1)], 10);
        // The restarted node reports before gossip tells of its new generation.
        let c = a.report((2, 0), 2, None, vec![on("bob", 1, 15)], 20);
        assert_eq!(flips(&c), [("alice".into(), false, 0, 20), ("bob".into(), true, 1, 15)]);
        assert!(a.retain(&live(&[(1, 1), (2, 1)]), 25).is_empty(), "gossip is behind");
        // A late report of the old generation changes nothing.
        assert!(a.report((2, 0), 1, None, vec![on("alice", 1, 1)], 30).is_empty());
        assert_eq!(a.current("alice").map(|p| p.online), Some(false));
    }

    #[test]
    fn given_a_user_seen_online_through_nodes_that_all_died_should_be_reported_gone() {
        let mut w = Watch::default();
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        let changed = |online: bool, nodes: Vec<NodeId>| wire::Changed {
            presence: Some(Presence { online, ..Presence::default() }),
            nodes,
        };
        w.note(&alice, &changed(true, vec![2, 3]));
        w.note(&bob, &changed(true, vec![3]));
        assert_eq!(w.gone(&live(&[(1, 1), (2, 1)])), vec![bob.clone()]);
        assert!(w.gone(&live(&[(1, 1), (2, 1)])).is_empty(), "reported once");
        w.note(&alice, &changed(false, vec![]));
        assert!(w.gone(&live(&[(1, 1)])).is_empty());
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
