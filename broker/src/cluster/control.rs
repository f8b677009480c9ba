//! The control plane: which node leads each partition, in which epoch, with which replicas.
//!
//! The partition table is the state machine of a Raft group (openraft, [`super::raft`]) whose
//! voters are the cluster's nodes. Only its leader plans changes, and a change exists only once
//! Raft has committed it, so two nodes can never both be told they lead a partition in one
//! epoch: epochs are allocated by the Raft log, as the replication rule requires.
//!
//! - **Bootstrap**: once `cluster.bootstrap_expect` nodes are live in gossip and none of them is
//!   already part of a control plane, the one with the lowest id initializes Raft with them.
//! - **Joining**: the Raft leader adds every live node that gossip knows and Raft does not,
//!   first as a learner (it catches up), then as a voter. Nodes are never removed
//!   automatically: gossip only suspects, and a suspected node may be partitioned, not dead.
//! - **Placement**: when the table is empty and enough voters exist, every partition gets
//!   `min(cluster.replication, voters)` replicas by rendezvous hashing, epoch 1, led by its
//!   preferred replica.
//! - **Failover**: a partition whose leader gossip suspects gets a new epoch led by the first
//!   live node of its replica set. Gossip triggers it; the Raft commit decides it. The replica
//!   set does not change. A leader that restarted (newer generation) gets a new epoch too: its
//!   leading state was in memory.
//!
//! [`plan`] is pure; [`ControlPlane`] runs Raft, the peer RPC server and the planner on the
//! control thread.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use openraft::BasicNode;
use openraft::ChangeMembers;
use openraft::error::{InitializeError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::NodeId;
use super::membership::View;
use super::placement::{PARTITION_COUNT, PartitionId, Placement};
use super::raft::{self, Machine, Network, Raft, StateMachine, Store};
use crate::config::ClusterConfig;

/// One partition's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Incremented on every leader change; never reused.
    pub epoch: u64,
    /// The node that leads the partition in this epoch.
    pub leader: NodeId,
    /// The leader's generation when it was appointed: a leader that restarted lost its
    /// leading state (it is in memory), so a newer generation of it gets a new epoch.
    pub generation: u64,
    /// The replica set, in placement order (the first is the preferred leader).
    pub replicas: Vec<NodeId>,
    /// While the set changes: the previous set. The epoch's leader needs majorities of both
    /// until it has served in the new set, which [`Command::Settle`] records.
    #[serde(default)]
    pub previous: Vec<NodeId>,
}

/// The partition table: empty until placed, then one assignment per partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    /// Indexed by partition.
    pub partitions: Vec<Assignment>,
    /// Nodes an operator removed ([`Command::Remove`]): placement leaves them out, so their
    /// copies move to the other nodes through joint epochs; once they hold none they leave
    /// the Raft group. A removed id never rejoins.
    #[serde(default)]
    pub removed: BTreeSet<NodeId>,
}

/// A leader change of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lead {
    /// The partition.
    pub partition: PartitionId,
    /// Its new epoch: exactly one more than the current one, or the change is void.
    pub epoch: u64,
    /// The new leader, a member of the replica set.
    pub leader: NodeId,
    /// The new leader's current generation.
    pub generation: u64,
    /// A new replica set (a rebalancing move), or `None` to keep the set. A move starts only
    /// when no other move of the partition is in progress; the current set becomes
    /// `previous`.
    #[serde(default)]
    pub replicas: Option<Vec<NodeId>>,
}

/// A change to the table, proposed by the Raft leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// The first placement of every partition (void unless the table is empty).
    Place {
        /// One per partition, each at epoch 1.
        partitions: Vec<Assignment>,
    },
    /// New epochs with new leaders (and possibly new replica sets) for some partitions.
    Lead {
        /// The changes; each is checked on its own.
        changes: Vec<Lead>,
    },
    /// Ends set changes whose epoch's leader has served in the new set: `previous` is
    /// dropped (a change for an older epoch is void).
    Settle {
        /// `(partition, epoch)` pairs.
        settled: Vec<(PartitionId, u64)>,
    },
    /// Removes a node from the cluster for good (an operator's decision: gossip never makes
    /// it). Void when it is already removed.
    Remove {
        /// The node.
        node: NodeId,
    },
}

/// What applying a command changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Partitions whose assignment changed.
    pub changed: u32,
}

impl Table {
    /// Applies a committed command. A change that is stale (its epoch is not the next one) or
    /// invalid (a leader outside the replica set) is void, so a planner that acted on an old
    /// table cannot undo a newer decision.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        let mut changed = 0u32;
        match cmd {
            Command::Place { partitions } => {
                let valid = self.partitions.is_empty()
                    && partitions.len() == PARTITION_COUNT
                    && partitions.iter().all(|a| a.epoch == 1 && a.replicas.contains(&a.leader));
                if valid {
                    self.partitions.clone_from(partitions);
                    changed = u32::try_from(partitions.len()).unwrap_or(u32::MAX);
                }
            }
            Command::Lead { changes } => {
                for c in changes {
                    let Some(a) = self.partitions.get_mut(usize::from(c.partition)) else {
                        continue;
                    };
                    if c.epoch != a.epoch + 1 {
                        continue;
                    }
                    match &c.replicas {
                        None if a.replicas.contains(&c.leader) => {}
                        Some(set) if valid_move(a, set, c.leader) => {
                            a.previous = std::mem::replace(&mut a.replicas, set.clone());
                        }
                        _ => continue,
                    }
                    a.epoch = c.epoch;
                    a.leader = c.leader;
                    a.generation = c.generation;
                    changed += 1;
                }
            }
            Command::Remove { node } => {
                if self.removed.insert(*node) {
                    tracing::info!(node, "node removed from the partition table's placement");
                }
            }
            Command::Settle { settled } => {
                for &(p, epoch) in settled {
                    if let Some(a) = self.partitions.get_mut(usize::from(p))
                        && a.epoch == epoch
                        && !a.previous.is_empty()
                    {
                        a.previous.clear();
                        changed += 1;
                    }
                }
            }
        }
        Applied { changed }
    }

    /// Copies `node` holds or is still counted for (in a replica set, or in the previous
    /// set of a move in progress).
    #[must_use]
    pub fn copies(&self, node: NodeId) -> usize {
        self.partitions
            .iter()
            .filter(|a| a.replicas.contains(&node) || a.previous.contains(&node))
            .count()
    }

    /// Removed nodes that hold no copy any more (they can leave the Raft group).
    pub fn drained(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.removed.iter().copied().filter(|&n| self.copies(n) == 0)
    }

    /// Partitions led by each node.
    #[must_use]
    pub fn led(&self) -> BTreeMap<NodeId, usize> {
        let mut led = BTreeMap::new();
        for a in &self.partitions {
            *led.entry(a.leader).or_default() += 1;
        }
        led
    }
}

/// A move to `set` led by `leader` is valid when no move is in progress, the set is new,
/// non-empty and without duplicates, and the leader belongs to it.
fn valid_move(a: &Assignment, set: &[NodeId], leader: NodeId) -> bool {
    let distinct: BTreeSet<NodeId> = set.iter().copied().collect();
    a.previous.is_empty()
        && !set.is_empty()
        && distinct.len() == set.len()
        && set.contains(&leader)
        && distinct != a.replicas.iter().copied().collect()
}

/// Most partitions whose replica set changes at once (bounds the data in motion).
pub const MAX_MOVING: usize = 128;

/// What the Raft leader should propose next, if anything, given `placement`: every
/// partition's set over the current voters (the control loop keeps it until the voters
/// change: computing it is most of a plan's cost).
/// - the first placement, once there are at least `min_voters` voters;
/// - a new epoch for every partition whose leader gossip suspects (`down`: heard from, then
///   silent or leaving), led by the first `live` node of its replica set. A node gossip has
///   not heard from yet is neither live nor down: a control leader that just started must not
///   fail over partitions of nodes it simply has not met;
/// - a new epoch, same leader, for every partition whose leader restarted (gossip shows a
///   newer generation than the one it was appointed in);
/// - otherwise, rebalancing: partitions whose replica set differs from the placement over the
///   current voters move to it (at most [`MAX_MOVING`] at a time, only onto live nodes), led
///   by the new set's preferred replica.
///
/// `live` maps each live node to its current generation.
#[must_use]
pub fn plan(
    table: &Table,
    placement: &Placement,
    live: &BTreeMap<NodeId, u64>,
    down: &BTreeSet<NodeId>,
    min_voters: usize,
) -> Option<Command> {
    if table.partitions.is_empty() {
        if placement.members().len() < min_voters {
            return None;
        }
        let partitions = placement
            .iter()
            .map(|(_, set)| {
                let leader = set.iter().copied().find(|n| live.contains_key(n)).unwrap_or(set[0]);
                Assignment {
                    epoch: 1,
                    leader,
                    generation: live.get(&leader).copied().unwrap_or(0),
                    replicas: set.to_vec(),
                    previous: Vec::new(),
                }
            })
            .collect();
        return Some(Command::Place { partitions });
    }
    let changes: Vec<Lead> = table
        .partitions
        .iter()
        .enumerate()
        .filter_map(|(p, a)| {
            let partition = PartitionId::try_from(p).ok()?;
            let epoch = a.epoch + 1;
            if down.contains(&a.leader) {
                let leader = a.replicas.iter().copied().find(|n| live.contains_key(n))?;
                let generation = live[&leader];
                return Some(Lead { partition, epoch, leader, generation, replicas: None });
            }
            match live.get(&a.leader) {
                Some(&generation) if generation > a.generation => {
                    Some(Lead { partition, epoch, leader: a.leader, generation, replicas: None })
                }
                _ => None,
            }
        })
        .collect();
    if !changes.is_empty() {
        return Some(Command::Lead { changes });
    }
    rebalance(table, placement, live)
}

/// Whether two small replica sets hold the same nodes.
fn same_nodes(a: &[NodeId], b: &[NodeId]) -> bool {
    a.len() == b.len() && a.iter().all(|n| b.contains(n))
}

/// Moves toward the placement over `voters` (see [`plan`]).
fn rebalance(
    table: &Table,
    placement: &Placement,
    live: &BTreeMap<NodeId, u64>,
) -> Option<Command> {
    let moving = table.partitions.iter().filter(|a| !a.previous.is_empty()).count();
    let room = MAX_MOVING.saturating_sub(moving);
    if room == 0 {
        return None;
    }
    let changes: Vec<Lead> = placement
        .iter()
        .filter_map(|(p, want)| {
            let a = table.partitions.get(usize::from(p))?;
            if !a.previous.is_empty()
                || same_nodes(want, &a.replicas)
                || !want.iter().all(|n| live.contains_key(n))
            {
                return None;
            }
            // The preferred replica leads: the new epoch changes leaders' state anyway, and
            // keeping old leaders would leave a new node leading nothing.
            let leader = want[0];
            Some(Lead {
                partition: p,
                epoch: a.epoch + 1,
                leader,
                generation: live[&leader],
                replicas: Some(want.to_vec()),
            })
        })
        .take(room)
        .collect();
    (!changes.is_empty()).then_some(Command::Lead { changes })
}

/// The control plane as this node sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControlView {
    /// The Raft leader, if one is known.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// Raft voters.
    pub voters: Vec<NodeId>,
    /// Raft learners (joining nodes catching up).
    pub learners: Vec<NodeId>,
    /// The committed partition table.
    #[serde(skip)]
    pub machine: Arc<Machine>,
}

impl ControlView {
    /// Whether the partition table is placed and a Raft leader is known.
    #[must_use]
    pub fn ready(&self) -> bool {
        self.leader.is_some() && !self.machine.table.partitions.is_empty()
    }
}

/// The running control plane of this node.
#[derive(Debug)]
pub struct ControlPlane {
    view: watch::Receiver<Arc<ControlView>>,
    replication: watch::Receiver<super::replication::ReplicationView>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// Its database could not be opened or read.
    #[error("control plane storage: {0}")]
    Storage(String),
    /// Its listener or thread could not start.
    #[error("control plane: {0}")]
    Io(#[from] std::io::Error),
}

impl ControlPlane {
    /// Opens the control plane's storage, serves peer RPCs on `listener` (TCP, the gossip port;
    /// see [`super::membership::bind_cluster_port`]) and starts Raft and the planner on their own
    /// thread.
    ///
    /// # Errors
    /// When storage cannot be opened or the listener cannot be used.
    pub fn start(
        config: &ClusterConfig,
        data_dir: &std::path::Path,
        node: NodeId,
        listener: std::net::TcpListener,
        gossip: watch::Receiver<Arc<View>>,
        announce: super::membership::Announce,
        data: Option<(
            super::dataplane::DataPlane,
            tokio::sync::mpsc::Receiver<super::dataplane::Proposal>,
        )>,
    ) -> Result<Self, ControlError> {
        let store = Store::open(data_dir).map_err(|e| ControlError::Storage(e.to_string()))?;
        let (state_machine, machine) =
            StateMachine::open(store.clone()).map_err(|e| ControlError::Storage(e.to_string()))?;
        let listen = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let network = Network::new(Some(listen.ip())).map_err(std::io::Error::other)?;
        let (settle_tx, settle_rx) = tokio::sync::mpsc::channel(64);
        let shards = data.as_ref().map(|(d, _)| d.shards.clone()).unwrap_or_default();
        let serving = data.as_ref().map(|(d, _)| d.partitions.clone());
        let storage = data.as_ref().map(|(d, _)| d.storage.clone());
        let repair_writer = data.as_ref().map(|(d, _)| d.writer.clone());
        let (engine, inbox, replication) = super::replication::open(
            node,
            data_dir,
            network.client(),
            settle_tx.clone(),
            data,
            config.log_memory_entries,
        )
        .map_err(ControlError::Storage)?;
        let client = network.client();
        let anti_entropy = Duration::from_millis(config.anti_entropy_interval_ms);
        let engine_table = machine.clone();
        let election = config.election_timeout_ms;
        let raft_config = openraft::Config {
            cluster_name: config.cluster_id.clone(),
            election_timeout_min: election,
            election_timeout_max: election * 2,
            heartbeat_interval: (election / 5).max(1),
            install_snapshot_timeout: election * 2,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|e| ControlError::Storage(e.to_string()))?;
        let settings = Settings {
            node,
            replication: config.replication,
            bootstrap_expect: config.bootstrap_expect,
        };
        let (view_tx, view) = watch::channel(Arc::new(ControlView::default()));
        let stop = CancellationToken::new();
        let stop_rx = stop.clone();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new().name("sb-control".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(ControlError::Io(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let raft =
                    match Raft::new(node, Arc::new(raft_config), network, store, state_machine)
                        .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = started_tx.send(Err(ControlError::Storage(e.to_string())));
                            return;
                        }
                    };
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = started_tx.send(Err(ControlError::Io(e)));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                let peers_storage = storage.clone();
                let peers = Peers {
                    raft: raft.clone(),
                    inbox,
                    settle: settle_tx,
                    shards,
                    storage,
                    machine: machine.clone(),
                    replication: settings.replication,
                    me: node,
                    serving,
                    removing: Arc::default(),
                };
                let server = tokio::spawn(serve_peers(peers, listener));
                let engine_stop = Arc::new(Notify::new());
                let data = tokio::spawn(engine.run(engine_table, engine_stop.clone()));
                let repair_stop = Arc::new(Notify::new());
                if let (Some(storage), Some(writer), true) =
                    (peers_storage, repair_writer, anti_entropy > Duration::ZERO)
                {
                    let task = super::antientropy::AntiEntropy {
                        me: node,
                        storage,
                        writer,
                        control: view_tx.subscribe(),
                        client: client.clone(),
                        interval: anti_entropy,
                    };
                    tokio::spawn(task.run(repair_stop.clone()));
                }
                let links = Links { gossip, machine, settle: settle_rx, client };
                run(&raft, &settings, links, &view_tx, &announce, &stop_rx).await;
                engine_stop.notify_one();
                repair_stop.notify_one();
                let _ = data.await;
                server.abort();
                let _ = tokio::time::timeout(Duration::from_secs(2), raft.shutdown()).await;
            });
        })?;
        started_rx.recv().map_err(|_| std::io::Error::other("control thread died"))??;
        tracing::info!(node, %listen, "control plane started");
        Ok(Self { view, replication, stop, thread: Some(thread) })
    }

    /// The replication engine's live summary.
    #[must_use]
    pub fn replication(&self) -> watch::Receiver<super::replication::ReplicationView> {
        self.replication.clone()
    }

    /// The live control view.
    #[must_use]
    pub fn view(&self) -> watch::Receiver<Arc<ControlView>> {
        self.view.clone()
    }

    /// Stops Raft and the peer server.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.cancel();
            let _ = t.join();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Settings {
    node: NodeId,
    replication: usize,
    bootstrap_expect: usize,
}

/// How often the planner looks at gossip and the table.
const PLAN_EVERY: Duration = Duration::from_millis(200);

/// Longest wait for one control plane change (bootstrap, join, proposal).
const RAFT_OP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the control loop listens to besides Raft.
struct Links {
    gossip: watch::Receiver<Arc<View>>,
    machine: watch::Receiver<Arc<Machine>>,
    /// Settled moves, from this node's engine and forwarded by peers.
    settle: tokio::sync::mpsc::Receiver<super::replication::Settled>,
    /// For forwarding settled moves to the Raft leader.
    client: reqwest::Client,
}

async fn run(
    raft: &Raft,
    settings: &Settings,
    links: Links,
    view_tx: &watch::Sender<Arc<ControlView>>,
    announce: &super::membership::Announce,
    stop: &CancellationToken,
) {
    let Links { mut gossip, mut machine, mut settle, client } = links;
    let mut metrics = raft.metrics();
    let mut tick = tokio::time::interval(PLAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_leader = None;
    let mut suspicion = Suspicion::default();
    let mut cached: Option<(BTreeSet<NodeId>, Placement)> = None;
    let mut retired = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
            r = metrics.changed() => if r.is_err() { return },
            r = machine.changed() => if r.is_err() { return },
            r = gossip.changed() => if r.is_err() { return },
            s = settle.recv() => {
                let Some(mut settled) = s else { return };
                while let Ok(more) = settle.try_recv() {
                    settled.extend(more);
                }
                settle_moves(raft, settings.node, settled, &client, stop).await;
                continue;
            }
        }
        let m = metrics.borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let known: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let table = machine.borrow().clone();
        if known.contains(&settings.node) {
            // Tells bootstrapping nodes that a control plane exists here.
            announce.set(super::membership::CONTROL_KEY, "member");
        }
        // Tells every node (a removed one that was down when it was removed included) which
        // removed nodes are gone for good.
        let drained: Vec<String> = table.table.drained().map(|n| n.to_string()).collect();
        announce.set(super::membership::REMOVED_KEY, &drained.join(","));
        if m.current_leader != last_leader {
            last_leader = m.current_leader;
            metrics::counter!(crate::metrics::CLUSTER_LEADER_CHANGES).increment(1);
            tracing::info!(leader = ?m.current_leader, term = m.current_term, "control plane leader");
        }
        let led = table.table.led().get(&settings.node).copied().unwrap_or(0);
        metrics::gauge!(crate::metrics::CLUSTER_PARTITIONS_LED).set(led as f64);
        view_tx.send_replace(Arc::new(ControlView {
            leader: m.current_leader,
            term: m.current_term,
            voters: voters.iter().copied().collect(),
            learners: membership.learner_ids().collect(),
            machine: table.clone(),
        }));
        let view = gossip.borrow().clone();
        if view.self_removed() && !retired {
            retired = true;
            announce.set(super::membership::RETIRED_KEY, "true");
            tracing::error!(
                node = settings.node,
                "this node was removed from the cluster: it serves nothing; stop it (a removed \
                 node id never rejoins: start a new node with an empty data directory instead)"
            );
        }
        let live: BTreeMap<NodeId, u64> =
            view.members.iter().filter(|m| m.live).map(|m| (m.id, m.generation)).collect();
        let down = suspicion.down(&view, tokio::time::Instant::now());
        // Raft operations wait for a quorum that may be gone: each is bounded, and stopping
        // interrupts it, so the loop never hangs on a cluster that lost its majority.
        let step = async {
            if known.is_empty() && m.last_log_index.is_none() {
                bootstrap(raft, settings, &view).await;
            } else if m.current_leader == Some(settings.node) {
                let t = &table.table;
                if join(raft, &view, &known, &voters, &t.removed).await
                    || retire(raft, t, &known, &voters).await
                {
                    return;
                }
                let min_voters = settings.bootstrap_expect.min(settings.replication);
                // Removed nodes are left out of the placement: their copies move away.
                let members: BTreeSet<NodeId> = voters.difference(&t.removed).copied().collect();
                let fresh = cached.as_ref().is_none_or(|(v, _)| *v != members);
                if fresh {
                    if members.len() > settings.replication {
                        tracing::warn!(
                            nodes = members.len(),
                            replication = settings.replication,
                            "more nodes than replicas: a node outside a conversation's replica \
                             set reads and follows it through other nodes, with the limits in \
                             docs/cluster.md; cluster.replication = node count avoids them"
                        );
                    }
                    cached = Placement::uniform(members.iter().copied(), settings.replication)
                        .ok()
                        .map(|p| (members, p));
                }
                let Some((_, placement)) = &cached else { return };
                if let Some(cmd) = plan(t, placement, &live, &down, min_voters) {
                    propose(raft, cmd).await;
                }
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(RAFT_OP_TIMEOUT, step) => if r.is_err() {
                tracing::warn!("control plane change timed out (no quorum?); retrying");
            },
        }
    }
}

/// Records settled moves: proposed here when this node is the Raft leader, else forwarded to
/// the leader (a lost report is repeated by the partition's leader until the table has it).
async fn settle_moves(
    raft: &Raft,
    me: NodeId,
    settled: super::replication::Settled,
    client: &reqwest::Client,
    stop: &CancellationToken,
) {
    let m = raft.metrics().borrow().clone();
    match m.current_leader {
        Some(leader) if leader == me => {
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::time::timeout(RAFT_OP_TIMEOUT, propose(raft, Command::Settle { settled })) => {}
            }
        }
        Some(leader) => {
            let Some(node) = m.membership_config.membership().get_node(&leader) else { return };
            let url = format!("http://{}{SETTLE_PATH}", node.addr);
            let body = serde_json::to_vec(&settled).unwrap_or_default();
            let post = client.post(url).body(body).timeout(Duration::from_secs(2)).send();
            tokio::spawn(async move {
                if let Err(e) = post.await {
                    tracing::debug!(error = %e, "settle report not delivered to the control leader");
                }
            });
        }
        None => {}
    }
}

/// Peer path where nodes forward settled moves to the control leader.
const SETTLE_PATH: &str = "/control/settle";

/// How long a node gossip knows of but has never seen live counts as merely unknown.
const UNMET_GRACE: Duration = Duration::from_secs(10);

/// Which nodes the planner treats as down. Gossip learns of a node (from a third party)
/// before it hears from it, and shows it not live meanwhile: a node that was live in this
/// process and is not now is down at once, but one never seen live only after
/// [`UNMET_GRACE`] (so a control leader that just started, or a cluster restarting together,
/// does not fail over partitions of nodes that are merely slow to be heard from).
#[derive(Debug, Default)]
struct Suspicion {
    /// Per node: when this process first knew of it, and whether it has been live since.
    known: BTreeMap<NodeId, (tokio::time::Instant, bool)>,
}

impl Suspicion {
    fn down(&mut self, view: &View, now: tokio::time::Instant) -> BTreeSet<NodeId> {
        let mut down = BTreeSet::new();
        for m in &view.members {
            let (since, met) = self.known.entry(m.id).or_insert((now, false));
            *met |= m.live;
            if !m.live && (*met || m.leaving || now.duration_since(*since) >= UNMET_GRACE) {
                down.insert(m.id);
            }
        }
        down
    }
}

/// Initializes Raft when this node has no seeds (it founds the cluster), enough nodes are
/// live, and no live node already belongs to a control plane (a restarted member must rejoin
/// its cluster, not found another).
async fn bootstrap(raft: &Raft, settings: &Settings, view: &View) {
    let live: Vec<_> = view.members.iter().filter(|m| m.live).collect();
    // Only a node without seeds founds: nodes that join through seeds never do, so two
    // groups of nodes that have not heard of each other's control plane yet cannot both
    // found one (two control planes would allocate the same epochs twice).
    if view.seeded || live.len() < settings.bootstrap_expect || live.iter().any(|m| m.control) {
        return;
    }
    let nodes: BTreeMap<NodeId, BasicNode> =
        live.iter().map(|m| (m.id, BasicNode::new(m.gossip.to_string()))).collect();
    tracing::info!(voters = ?nodes.keys().collect::<Vec<_>>(), "bootstrapping the control plane");
    match raft.initialize(nodes).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
        Err(e) => tracing::warn!(error = %e, "control plane bootstrap failed"),
    }
}

/// Adds one live node that Raft does not know yet: learner first, then voter. Returns whether
/// it tried (one change at a time). Removed nodes are never added back.
async fn join(
    raft: &Raft,
    view: &View,
    known: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
    removed: &BTreeSet<NodeId>,
) -> bool {
    let candidates = || view.members.iter().filter(|m| m.live && !removed.contains(&m.id));
    // A live learner whose promotion failed earlier (timeout, leader change) is promoted now.
    let stuck = candidates().find(|m| known.contains(&m.id) && !voters.contains(&m.id));
    let new = candidates().find(|m| !known.contains(&m.id));
    let Some(new) = stuck.or(new) else {
        return false;
    };
    if !known.contains(&new.id) {
        tracing::info!(node = new.id, "adding node to the control plane");
        let node = BasicNode::new(new.gossip.to_string());
        if let Err(e) = raft.add_learner(new.id, node, true).await {
            tracing::warn!(node = new.id, error = %e, "cannot add learner");
            return true;
        }
    }
    let voters = ChangeMembers::AddVoterIds(BTreeSet::from([new.id]));
    if let Err(e) = raft.change_membership(voters, false).await {
        tracing::warn!(node = new.id, error = %e, "cannot promote learner to voter");
    }
    true
}

/// Takes one removed node that holds no copy any more out of the Raft group (a voter, or a
/// learner that never became one). Returns whether it tried (one change at a time).
async fn retire(
    raft: &Raft,
    table: &Table,
    known: &BTreeSet<NodeId>,
    voters: &BTreeSet<NodeId>,
) -> bool {
    let Some(node) = table.drained().find(|n| known.contains(n)) else {
        return false;
    };
    // The last voter stays: the removal request refuses to remove it, but a table from
    // older code could still ask for it.
    if voters.len() == 1 && voters.contains(&node) {
        return false;
    }
    tracing::info!(node, "removing a drained node from the control plane");
    let change = if voters.contains(&node) {
        ChangeMembers::RemoveVoters(BTreeSet::from([node]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([node]))
    };
    if let Err(e) = raft.change_membership(change, false).await {
        tracing::warn!(node, error = %e, "cannot remove the node from the control plane");
    }
    true
}

async fn propose(raft: &Raft, cmd: Command) {
    let what = match &cmd {
        Command::Place { partitions } => format!("place {} partitions", partitions.len()),
        Command::Lead { changes } => {
            let moves = changes.iter().filter(|c| c.replicas.is_some()).count();
            format!("new epochs for {} partitions ({moves} moving)", changes.len())
        }
        Command::Settle { settled } => format!("settle {} moved partitions", settled.len()),
        Command::Remove { node } => format!("remove node {node}"),
    };
    match raft.client_write(cmd).await {
        Ok(r) => {
            metrics::counter!(crate::metrics::CLUSTER_EPOCH_CHANGES)
                .increment(u64::from(r.data.changed));
            tracing::info!(change = what, applied = r.data.changed, "partition table changed");
        }
        Err(e) => tracing::warn!(change = what, error = %e, "partition table change failed"),
    }
}

type Body = Full<Bytes>;

/// Largest peer request body (a snapshot chunk is at most openraft's 3 MiB default).
const MAX_PEER_BODY: usize = 16 << 20;

/// What the peer server hands requests to.
#[derive(Clone)]
struct Peers {
    raft: Raft,
    inbox: super::replication::Inbox,
    settle: tokio::sync::mpsc::Sender<super::replication::Settled>,
    /// Every shard's mailbox, for forwarded requests.
    shards: Vec<tokio::sync::mpsc::Sender<crate::shard::ShardMsg>>,
    /// The message store (last-seen times for presence queries).
    storage: Option<Arc<crate::storage::Storage>>,
    /// The committed partition table (for removal requests).
    machine: watch::Receiver<Arc<Machine>>,
    /// `cluster.replication`.
    replication: usize,
    /// This node.
    me: NodeId,
    /// Which partitions this node serves as leader (data plane).
    serving: Option<Arc<super::dataplane::Partitions>>,
    /// Removal requests are validated and proposed one at a time (two at once could both
    /// pass the check that enough nodes remain).
    removing: Arc<tokio::sync::Mutex<()>>,
}

/// Peer path where a node hands an operator's removal request to the control leader.
pub const REMOVE_PATH: &str = "/control/remove";

/// A removal request ([`REMOVE_PATH`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// The node to remove.
    pub node: NodeId,
}

/// Serves a removal request on the control leader: validates it against the current voters
/// and proposes [`Command::Remove`]. Answers JSON: `202` with the node's state, `404` for a
/// node the cluster does not know, `409` when too few nodes would remain, `421` with the
/// leader's id when this node does not lead the control plane, `503` when the change could
/// not be committed.
async fn remove_node(peers: &Peers, body: &[u8]) -> Response<Body> {
    let reply = |status, v: serde_json::Value| json(status, v.to_string().into_bytes());
    let Ok(RemoveRequest { node }) = serde_json::from_slice(body) else {
        return reply(StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad request"}));
    };
    let _one_at_a_time = peers.removing.lock().await;
    let m = peers.raft.metrics().borrow().clone();
    if m.current_leader != Some(m.id) {
        return reply(
            StatusCode::MISDIRECTED_REQUEST,
            serde_json::json!({"error": "not the control leader", "leader": m.current_leader}),
        );
    }
    let table = peers.machine.borrow().clone();
    let membership = m.membership_config.membership();
    let known = membership.nodes().any(|(id, _)| *id == node);
    // `removing` while it holds copies or is still in the Raft group, then `removed`.
    let state = |t: &Table| {
        let copies = t.copies(node);
        let state = if copies == 0 && !known { "removed" } else { "removing" };
        serde_json::json!({"node": node, "state": state, "copies": copies})
    };
    if table.table.removed.contains(&node) {
        return reply(StatusCode::ACCEPTED, state(&table.table));
    }
    if !known && table.table.copies(node) == 0 {
        return reply(StatusCode::NOT_FOUND, serde_json::json!({"error": "unknown node"}));
    }
    let remaining =
        membership.voter_ids().filter(|v| *v != node && !table.table.removed.contains(v)).count();
    if remaining < peers.replication {
        let error = format!(
            "removing node {node} would leave {remaining} nodes for {} replicas: add a node first",
            peers.replication
        );
        return reply(StatusCode::CONFLICT, serde_json::json!({"error": error}));
    }
    let write = peers.raft.client_write(Command::Remove { node });
    match tokio::time::timeout(RAFT_OP_TIMEOUT, write).await {
        Ok(Ok(_)) => {
            tracing::info!(node, "node removal committed; its copies move away");
            let table = peers.machine.borrow().clone();
            reply(StatusCode::ACCEPTED, state(&table.table))
        }
        Ok(Err(e)) => {
            reply(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": e.to_string()}))
        }
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "the control plane did not commit in time (no quorum?)"}),
        ),
    }
}

async fn serve_peers(peers: Peers, listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let peers = peers.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let peers = peers.clone();
                async move { Ok::<_, Infallible>(peer_request(&peers, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

async fn peer_request(peers: &Peers, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let (raft, inbox) = (&peers.raft, &peers.inbox);
    let path = req.uri().path().to_owned();
    let body = match Limited::new(req.into_body(), MAX_PEER_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(StatusCode::PAYLOAD_TOO_LARGE, Vec::new()),
    };
    let reply = match path.as_str() {
        SETTLE_PATH => {
            return match serde_json::from_slice(&body) {
                Ok(settled) => {
                    let _ = peers.settle.try_send(settled);
                    json(StatusCode::NO_CONTENT, Vec::new())
                }
                Err(_) => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        REMOVE_PATH => return remove_node(peers, &body).await,
        crate::shard::interest::FOLLOW_PATH => {
            return if crate::shard::interest::serve_follow(&peers.shards, &body) {
                json(StatusCode::NO_CONTENT, Vec::new())
            } else {
                json(StatusCode::BAD_REQUEST, Vec::new())
            };
        }
        crate::shard::interest::PATH => {
            return match crate::shard::interest::serve(&peers.shards, &body).await {
                Some(reply) => json(StatusCode::OK, reply),
                None => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        crate::net::handler::userread::PATH => {
            let Some(storage) = peers.storage.clone() else {
                return json(StatusCode::NOT_FOUND, Vec::new());
            };
            // Readable here: this node serves the partition as leader or holds a complete copy
            // (the rule of `shard::Locator`).
            let table = peers.machine.borrow().clone();
            let me = peers.me;
            let serving = peers.serving.clone();
            let holds = |p: u16| {
                serving.as_ref().is_some_and(|s| s.serving(p).is_some())
                    || table
                        .table
                        .partitions
                        .get(usize::from(p))
                        .is_some_and(|a| crate::shard::complete(a, me))
            };
            return match crate::net::handler::userread::serve(storage, holds, &body).await {
                Some(reply) => json(StatusCode::OK, reply),
                None => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        super::dataplane::DELIVER_PATH => {
            return if super::dataplane::serve_pushes(&peers.shards, &body) {
                json(StatusCode::NO_CONTENT, Vec::new())
            } else {
                json(StatusCode::BAD_REQUEST, Vec::new())
            };
        }
        super::presence::PATH => {
            return if super::presence::serve_batch(&peers.shards, &body).await {
                json(StatusCode::NO_CONTENT, Vec::new())
            } else {
                json(StatusCode::BAD_REQUEST, Vec::new())
            };
        }
        super::presence::QUERY_PATH => {
            let Some(storage) = peers.storage.clone() else {
                return json(StatusCode::NOT_FOUND, Vec::new());
            };
            return match super::presence::serve_query(&peers.shards, storage, &body).await {
                Some(reply) => json(StatusCode::OK, reply),
                None => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        super::antientropy::DIGEST_PATH | super::antientropy::RANGE_PATH => {
            let Some(storage) = peers.storage.clone() else {
                return json(StatusCode::NOT_FOUND, Vec::new());
            };
            let reply = if path == super::antientropy::DIGEST_PATH {
                super::antientropy::serve_digest(storage, &body).await
            } else {
                super::antientropy::serve_range(storage, &body).await
            };
            return match reply {
                Some(reply) => json(StatusCode::OK, reply),
                None => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        super::dataplane::FORWARD_PATH => {
            return match super::dataplane::serve_forwarded(&peers.shards, &body).await {
                Some(replies) => json(StatusCode::OK, replies),
                None => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        super::replication::PATH => {
            return match inbox.deliver(&body) {
                Ok(()) => json(StatusCode::NO_CONTENT, Vec::new()),
                Err(_) => json(StatusCode::BAD_REQUEST, Vec::new()),
            };
        }
        raft::path::APPEND => match serde_json::from_slice(&body) {
            Ok(rpc) => serde_json::to_vec(&raft.append_entries(rpc).await),
            Err(_) => return json(StatusCode::BAD_REQUEST, Vec::new()),
        },
        raft::path::VOTE => match serde_json::from_slice(&body) {
            Ok(rpc) => serde_json::to_vec(&raft.vote(rpc).await),
            Err(_) => return json(StatusCode::BAD_REQUEST, Vec::new()),
        },
        raft::path::SNAPSHOT => match serde_json::from_slice(&body) {
            Ok(rpc) => serde_json::to_vec(&raft.install_snapshot(rpc).await),
            Err(_) => return json(StatusCode::BAD_REQUEST, Vec::new()),
        },
        _ => return json(StatusCode::NOT_FOUND, Vec::new()),
    };
    match reply {
        Ok(body) => json(StatusCode::OK, body),
        Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    /// [`plan`] with R = 3 over `voters`, placement computed here.
    fn plan3(
        table: &Table,
        voters: &BTreeSet<NodeId>,
        live: &BTreeMap<NodeId, u64>,
        down: &BTreeSet<NodeId>,
        min_voters: usize,
    ) -> Option<Command> {
        let placement = Placement::uniform(voters.iter().copied(), 3).ok()?;
        plan(table, &placement, live, down, min_voters)
    }

    /// Live nodes, each at generation 1.
    fn live(ids: &[NodeId]) -> BTreeMap<NodeId, u64> {
        ids.iter().map(|&id| (id, 1)).collect()
    }

    fn placed(voters: &[NodeId]) -> Table {
        let mut t = Table::default();
        let cmd = plan3(&t, &set(voters), &live(voters), &set(&[]), 3).expect("placement");
        assert_eq!(t.apply(&cmd).changed as usize, PARTITION_COUNT);
        t
    }

    #[test]
    fn given_too_few_voters_should_not_place() {
        assert_eq!(plan3(&Table::default(), &set(&[1, 2]), &live(&[1, 2]), &set(&[]), 3), None);
    }

    #[test]
    fn given_enough_voters_should_place_every_partition_on_three_replicas_at_epoch_one() {
        let t = placed(&[1, 2, 3, 4]);
        assert!(t.partitions.iter().all(|a| a.epoch == 1 && a.replicas.len() == 3));
        assert!(t.partitions.iter().all(|a| a.leader == a.replicas[0]));
        assert_eq!(t.led().len(), 4, "every node leads some partitions");
        assert_eq!(plan3(&t, &set(&[1, 2, 3, 4]), &live(&[1, 2, 3, 4]), &set(&[]), 3), None);
    }

    #[test]
    fn given_a_suspected_leader_should_move_only_its_partitions_to_a_live_replica_with_the_next_epoch()
     {
        let mut t = placed(&[1, 2, 3]);
        let before = t.clone();
        let cmd = plan3(&t, &set(&[1, 2, 3]), &live(&[1, 2]), &set(&[3]), 3).expect("failover");
        t.apply(&cmd);
        for (a, b) in before.partitions.iter().zip(&t.partitions) {
            assert_eq!(a.replicas, b.replicas, "replica sets do not change on failover");
            if a.leader == 3 {
                assert_eq!(b.epoch, 2);
                assert_eq!(b.leader, a.replicas.iter().copied().find(|&n| n != 3).unwrap());
            } else {
                assert_eq!(a, b);
            }
        }
        assert_eq!(t.led().get(&3), None);
    }

    #[test]
    fn given_a_stale_or_invalid_change_should_apply_nothing() {
        let mut t = placed(&[1, 2, 3]);
        let a = t.partitions[0].clone();
        let lead = |partition, epoch, leader| Lead {
            partition,
            epoch,
            leader,
            generation: 1,
            replicas: None,
        };
        let stale = lead(0, a.epoch, a.replicas[1]);
        let outsider = lead(0, a.epoch + 1, 99);
        let out_of_range = lead(u16::MAX, 2, 1);
        let cmd = Command::Lead { changes: vec![stale, outsider, out_of_range] };
        assert_eq!(t.apply(&cmd).changed, 0);
        assert_eq!(t.partitions[0], a);
        let again =
            plan3(&Table::default(), &set(&[1, 2, 3]), &live(&[1, 2, 3]), &set(&[]), 3).unwrap();
        assert_eq!(t.apply(&again).changed, 0, "a second placement is void");
    }

    #[test]
    fn given_no_live_replica_should_leave_the_partition_alone() {
        let t = placed(&[1, 2, 3]);
        assert_eq!(plan3(&t, &set(&[1, 2, 3]), &live(&[]), &set(&[1, 2, 3]), 3), None);
    }

    #[test]
    fn given_a_restarted_leader_should_give_it_a_new_epoch_of_its_own_partitions() {
        let mut t = placed(&[1, 2, 3]);
        let before = t.clone();
        let mut restarted = live(&[1, 2, 3]);
        restarted.insert(2, 2);
        let cmd = plan3(&t, &set(&[1, 2, 3]), &restarted, &set(&[]), 3).expect("new epochs");
        t.apply(&cmd);
        for (a, b) in before.partitions.iter().zip(&t.partitions) {
            if a.leader == 2 {
                assert_eq!((b.epoch, b.leader, b.generation), (2, 2, 2));
            } else {
                assert_eq!(a, b);
            }
        }
        assert_eq!(plan3(&t, &set(&[1, 2, 3]), &restarted, &set(&[]), 3), None);
    }

    #[test]
    fn given_a_node_never_seen_live_should_count_as_down_only_after_the_grace() {
        let member = |id, live| crate::cluster::membership::Member {
            id,
            generation: 1,
            gossip: ([127, 0, 0, 1], 1).into(),
            tcp: None,
            http: None,
            shards: 1,
            load: 0,
            live,
            leaving: false,
            control: true,
        };
        let view = |members| View {
            self_id: 1,
            generation: 1,
            seeded: false,
            members,
            removed: BTreeSet::new(),
        };
        let t0 = tokio::time::Instant::now();
        let mut s = Suspicion::default();
        assert_eq!(s.down(&view(vec![member(1, true), member(2, false)]), t0), set(&[]));
        assert_eq!(
            s.down(&view(vec![member(1, true), member(2, false)]), t0 + UNMET_GRACE),
            set(&[2])
        );
        let mut s = Suspicion::default();
        s.down(&view(vec![member(2, true)]), t0);
        assert_eq!(s.down(&view(vec![member(2, false)]), t0), set(&[2]), "seen live, now silent");
    }

    #[test]
    fn given_a_new_voter_should_move_bounded_batches_onto_it_and_settle_each_move() {
        let mut t = placed(&[1, 2, 3]);
        let four = set(&[1, 2, 3, 4]);
        let all = live(&[1, 2, 3, 4]);
        let want = Placement::uniform([1, 2, 3, 4], 3).unwrap();
        let mut rounds = 0;
        while let Some(cmd) = plan3(&t, &four, &all, &set(&[]), 3) {
            rounds += 1;
            assert!(rounds < 100, "rebalancing does not converge");
            let Command::Lead { changes } = &cmd else { panic!("expected moves: {cmd:?}") };
            assert!(changes.len() <= MAX_MOVING);
            t.apply(&cmd);
            let moving = moving(&t);
            assert!(moving.len() <= MAX_MOVING);
            for &(p, _) in &moving {
                let a = &t.partitions[usize::from(p)];
                assert!(a.replicas.contains(&a.leader));
                assert_eq!(a.epoch, 2);
            }
            // Nothing else moves until these settle.
            assert_eq!(plan3(&t, &four, &all, &set(&[]), 3), None);
            t.apply(&Command::Settle { settled: moving });
        }
        for (p, set) in want.iter() {
            let a = &t.partitions[usize::from(p)];
            let mut have = a.replicas.clone();
            let mut want = set.to_vec();
            have.sort_unstable();
            want.sort_unstable();
            assert_eq!(have, want, "partition {p}");
            assert!(a.previous.is_empty());
        }
        assert!(t.led().get(&4).is_some_and(|&n| n > 100), "node 4 leads: {:?}", t.led());
    }

    #[test]
    fn given_a_move_in_progress_should_refuse_a_second_move_and_a_stale_settle() {
        let mut t = placed(&[1, 2, 3]);
        let a = t.partitions[0].clone();
        let mv = |epoch, replicas: Vec<NodeId>| Command::Lead {
            changes: vec![Lead {
                partition: 0,
                epoch,
                leader: replicas[0],
                generation: 1,
                replicas: Some(replicas),
            }],
        };
        assert_eq!(t.apply(&mv(2, vec![4, 1, 2])).changed, 1);
        assert_eq!(t.partitions[0].previous, a.replicas);
        assert_eq!(t.apply(&mv(3, vec![5, 1, 2])).changed, 0, "one move at a time");
        assert_eq!(t.apply(&Command::Settle { settled: vec![(0, 1)] }).changed, 0, "stale epoch");
        assert_eq!(t.apply(&Command::Settle { settled: vec![(0, 2)] }).changed, 1);
        assert!(t.partitions[0].previous.is_empty());
        assert_eq!(t.apply(&mv(3, vec![4, 4, 2])).changed, 0, "duplicate replica");
    }

    /// `(partition, epoch)` of every move in progress.
    fn moving(t: &Table) -> Vec<(PartitionId, u64)> {
        t.partitions
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.previous.is_empty())
            .map(|(p, a)| (PartitionId::try_from(p).unwrap(), a.epoch))
            .collect()
    }

    /// Plans and applies until nothing is left to do, settling every move at once.
    fn converge(t: &mut Table, members: &BTreeSet<NodeId>, live: &BTreeMap<NodeId, u64>) {
        let down: BTreeSet<NodeId> =
            t.partitions.iter().map(|a| a.leader).filter(|n| !live.contains_key(n)).collect();
        for _ in 0..100 {
            let Some(cmd) = plan3(t, members, live, &down, 3) else { return };
            t.apply(&cmd);
            t.apply(&Command::Settle { settled: moving(t) });
        }
        panic!("does not converge");
    }

    #[test]
    fn given_a_removed_node_dead_or_alive_should_move_every_copy_off_it_then_call_it_drained() {
        for alive in [true, false] {
            let mut t = placed(&[1, 2, 3, 4]);
            assert!(t.copies(4) > 0);
            t.apply(&Command::Remove { node: 4 });
            assert_eq!(t.apply(&Command::Remove { node: 4 }).changed, 0, "idempotent");
            assert_eq!(t.drained().count(), 0, "it still holds copies");
            let up = if alive { live(&[1, 2, 3, 4]) } else { live(&[1, 2, 3]) };
            converge(&mut t, &set(&[1, 2, 3]), &up);
            assert_eq!(t.copies(4), 0, "alive {alive}");
            assert_eq!(t.drained().collect::<Vec<_>>(), vec![4]);
            let want = Placement::uniform([1, 2, 3], 3).unwrap();
            for (p, set) in want.iter() {
                let a = &t.partitions[usize::from(p)];
                assert!(same_nodes(&a.replicas, set), "partition {p}: {a:?}");
                assert_ne!(a.leader, 4);
            }
        }
    }

    #[test]
    fn given_a_leader_gossip_has_not_heard_from_yet_should_not_fail_over() {
        let t = placed(&[1, 2, 3]);
        assert_eq!(plan3(&t, &set(&[1, 2, 3]), &live(&[1]), &set(&[]), 3), None);
    }
}
