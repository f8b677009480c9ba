//! Membership and failure detection by gossip (chitchat, UDP on the cluster port).
//!
//! Every node gossips its identity — node id, a generation persisted and incremented on every
//! start, client and HTTP addresses, shard count, load — and learns everyone else's through
//! scuttlebutt anti-entropy, joining through the configured seeds. chitchat's phi-accrual
//! failure detector marks nodes live or dead; that verdict is a *suspicion* only: it may
//! trigger a failover, never decide one (epochs and replica sets are allocated by the control
//! plane, see `docs/cluster.md`).
//!
//! [`View`] is the folded result, published through a watch channel that shards read without
//! locking. Folding keeps, per node id, only the highest generation seen: a restarted node's
//! previous incarnation disappears from the view the moment its new generation is heard of,
//! without waiting for the failure detector.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, NodeState, spawn_chitchat};
use serde::Serialize;
use tokio::sync::{Notify, watch};

use super::NodeId;
use crate::config::ClusterConfig;

/// Gossip keys a node publishes about itself.
mod key {
    pub(super) const TCP: &str = "tcp";
    pub(super) const HTTP: &str = "http";
    pub(super) const SHARDS: &str = "shards";
    pub(super) const LOAD: &str = "load";
    pub(super) const STATE: &str = "state";
}

/// Gossip key set to `member` once the node belongs to a control plane (Raft group).
pub const CONTROL_KEY: &str = "control";

/// Gossip key: the nodes an operator removed whose copies have all moved away, as the
/// publishing node's partition table has them (comma-separated ids).
pub const REMOVED_KEY: &str = "removed";

/// Gossip key set to `true` by a node that learned it was removed: it serves nothing and
/// peers stop counting it live, like a node that is leaving.
pub const RETIRED_KEY: &str = "retired";

/// Publishes extra gossip keys about this node (applied on the next gossip round).
#[derive(Debug, Clone)]
pub struct Announce(Arc<watch::Sender<BTreeMap<String, String>>>);

impl Announce {
    /// Sets `key` to `value` unless it already has that value.
    pub fn set(&self, key: &str, value: &str) {
        self.0.send_if_modified(|keys| {
            if keys.get(key).map(String::as_str) == Some(value) {
                return false;
            }
            keys.insert(key.to_owned(), value.to_owned());
            true
        });
    }
}

/// `state` while the node serves; `leaving` once it has started a graceful shutdown.
const SERVING: &str = "serving";
const LEAVING: &str = "leaving";

/// Who this node is: its id (kept in the data directory) and its generation (incremented and
/// fsynced on every start, so a restart is told apart from a slow node without trusting
/// clocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The node id, unique in the cluster.
    pub node: NodeId,
    /// This start's generation, 1 on the first start.
    pub generation: u64,
}

/// Why the identity could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The data directory could not be read or written.
    #[error("cluster identity in {dir}: {source}")]
    Io {
        /// The directory.
        dir: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file exists but does not hold a number.
    #[error("cluster identity file {file} is damaged: {content:?}")]
    Damaged {
        /// The file.
        file: String,
        /// What it holds.
        content: String,
    },
    /// The configured id differs from the one this data directory belongs to.
    #[error(
        "data directory belongs to node {stored}, but cluster.node_id is {configured}; a node's data must not change hands"
    )]
    WrongNode {
        /// The id in the data directory.
        stored: NodeId,
        /// The configured id.
        configured: NodeId,
    },
}

impl Identity {
    /// Loads (or creates) this node's identity in `<data_dir>/cluster/` and increments the
    /// generation, durably, before returning. `configured` is `cluster.node_id`; when absent a
    /// random id is generated on the first start and kept.
    ///
    /// # Errors
    /// When the files cannot be read or written, are damaged, or name another node.
    pub fn load(data_dir: &Path, configured: Option<NodeId>) -> Result<Self, IdentityError> {
        let dir = data_dir.join("cluster");
        let io = |source| IdentityError::Io { dir: dir.display().to_string(), source };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let node = match (read_number(&dir.join("node_id"))?, configured) {
            (Some(stored), Some(configured)) if stored != configured => {
                return Err(IdentityError::WrongNode { stored, configured });
            }
            (Some(stored), _) => stored,
            (None, configured) => {
                let id = configured.unwrap_or_else(|| rand::random_range(1..=u64::from(u32::MAX)));
                write_durably(&dir, "node_id", id).map_err(io)?;
                id
            }
        };
        let generation = read_number(&dir.join("generation"))?.unwrap_or(0) + 1;
        write_durably(&dir, "generation", generation).map_err(io)?;
        Ok(Self { node, generation })
    }
}

fn read_number(file: &Path) -> Result<Option<u64>, IdentityError> {
    match std::fs::read_to_string(file) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| IdentityError::Damaged {
            file: file.display().to_string(),
            content: text.chars().take(40).collect(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Io { dir: file.display().to_string(), source }),
    }
}

/// Writes `name` atomically (temporary file, fsync, rename, fsync of the directory), so a
/// crash leaves either the old or the new number, never a torn one.
fn write_durably(dir: &Path, name: &str, value: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{value}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// One node as gossip describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Its current generation (restarts so far, plus one).
    pub generation: u64,
    /// Its gossip address.
    pub gossip: SocketAddr,
    /// Its binary protocol listener.
    pub tcp: Option<SocketAddr>,
    /// Its HTTP listener.
    pub http: Option<SocketAddr>,
    /// Its shard count.
    pub shards: u32,
    /// Open client connections, as last gossiped.
    pub load: u64,
    /// Whether the failure detector deems it alive and it has not announced that it is leaving.
    pub live: bool,
    /// It announced a graceful shutdown, or that it was removed from the cluster.
    pub leaving: bool,
    /// It belongs to a control plane.
    pub control: bool,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    /// This node.
    pub self_id: NodeId,
    /// This node's generation.
    pub generation: u64,
    /// Whether seeds were configured (a node with seeds is joined once it has heard of a peer).
    pub seeded: bool,
    /// Every known node, this one included, by id.
    pub members: Vec<Member>,
    /// Nodes removed from the cluster (their copies moved away), as live members announce.
    pub removed: BTreeSet<NodeId>,
}

impl View {
    /// Live nodes, this one included.
    #[must_use]
    pub fn live(&self) -> usize {
        self.members.iter().filter(|m| m.live).count()
    }

    /// Whether this node has joined: it has no seeds (it founds the cluster) or it has heard
    /// from at least one live peer.
    #[must_use]
    pub fn joined(&self) -> bool {
        !self.seeded || self.members.iter().any(|m| m.live && m.id != self.self_id)
    }

    /// Whether this node was removed from the cluster (by an operator, through the control
    /// plane): a removed node id never serves or rejoins.
    #[must_use]
    pub fn self_removed(&self) -> bool {
        self.removed.contains(&self.self_id)
    }
}

/// Folds gossip state into a [`View`]: node ids that do not parse are ignored (another
/// program on the port), and per node id only the highest generation is kept.
fn fold<'a>(
    me: &ChitchatId,
    seeded: bool,
    nodes: impl Iterator<Item = (&'a ChitchatId, &'a NodeState)>,
    live: &[&ChitchatId],
) -> View {
    let mut by_id: BTreeMap<NodeId, Member> = BTreeMap::new();
    let mut removed = BTreeSet::new();
    for (cid, state) in nodes {
        if live.contains(&cid)
            && let Some(list) = state.get(REMOVED_KEY)
        {
            removed.extend(list.split(',').filter_map(|id| id.parse::<NodeId>().ok()));
        }
        let Ok(id) = cid.node_id.parse::<NodeId>() else { continue };
        if by_id.get(&id).is_some_and(|m| m.generation >= cid.generation_id) {
            continue;
        }
        let leaving =
            state.get(key::STATE) == Some(LEAVING) || state.get(RETIRED_KEY) == Some("true");
        let member = Member {
            id,
            generation: cid.generation_id,
            gossip: cid.gossip_advertise_addr,
            tcp: state.get(key::TCP).and_then(|s| s.parse().ok()),
            http: state.get(key::HTTP).and_then(|s| s.parse().ok()),
            shards: state.get(key::SHARDS).and_then(|s| s.parse().ok()).unwrap_or(0),
            load: state.get(key::LOAD).and_then(|s| s.parse().ok()).unwrap_or(0),
            live: !leaving && live.contains(&cid),
            leaving,
            control: state.get(CONTROL_KEY) == Some("member"),
        };
        by_id.insert(id, member);
    }
    View {
        self_id: me.node_id.parse().unwrap_or_default(),
        generation: me.generation_id,
        seeded,
        members: by_id.into_values().collect(),
        removed,
    }
}

/// What this node advertises besides its gossip address.
#[derive(Debug, Clone, Copy)]
pub struct Advertise {
    /// Binary protocol listener.
    pub tcp: SocketAddr,
    /// HTTP listener.
    pub http: SocketAddr,
    /// Shard count.
    pub shards: usize,
}

/// Replaces an unspecified IP (0.0.0.0) in a listener address with the IP peers reach this
/// node at, so what is gossiped is dialable.
fn dialable(addr: SocketAddr, host: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() { SocketAddr::new(host.ip(), addr.port()) } else { addr }
}

/// A running gossip member. Dropping it without [`Membership::leave`] stops gossip abruptly
/// (peers then detect the node as dead).
#[derive(Debug)]
pub struct Membership {
    view: watch::Receiver<Arc<View>>,
    leave: Arc<Notify>,
    gossip: SocketAddr,
    listen: SocketAddr,
    announce: Announce,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Membership {
    /// Starts gossip on `listen` (UDP; a port chosen by [`bind_cluster_port`]) on its own thread
    /// and returns once the UDP socket is bound.
    ///
    /// # Errors
    /// When the gossip address cannot be bound or the thread cannot start.
    pub fn start(
        config: &ClusterConfig,
        listen: SocketAddr,
        identity: Identity,
        advertise: Advertise,
    ) -> std::io::Result<Self> {
        let gossip = config.advertise.map_or(listen, |a| dialable(a, listen));
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(identity.node.to_string(), identity.generation, gossip),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: Duration::from_millis(config.gossip_interval_ms),
            listen_addr: listen,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                // A peer heard from only once is judged against this interval.
                initial_interval: Duration::from_millis(config.gossip_interval_ms * 4),
                dead_node_grace_period: Duration::from_millis(config.dead_node_grace_ms),
                ..FailureDetectorConfig::default()
            },
            marked_for_deletion_grace_period: Duration::from_secs(3_600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let initial = vec![
            (key::TCP.to_owned(), dialable(advertise.tcp, gossip).to_string()),
            (key::HTTP.to_owned(), dialable(advertise.http, gossip).to_string()),
            (key::SHARDS.to_owned(), advertise.shards.to_string()),
            (key::LOAD.to_owned(), "0".to_owned()),
            (key::STATE.to_owned(), SERVING.to_owned()),
        ];
        let seeded = !config.seeds.is_empty();
        let me = chitchat_config.chitchat_id.clone();
        let (view_tx, view) = watch::channel(Arc::new(fold(&me, seeded, std::iter::empty(), &[])));
        let leave = Arc::new(Notify::new());
        let interval = chitchat_config.gossip_interval;
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let leave_rx = leave.clone();
        let (keys_tx, keys_rx) = watch::channel(BTreeMap::new());
        let announce = Announce(Arc::new(keys_tx));
        let thread = std::thread::Builder::new().name("sb-gossip".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let handle = match spawn_chitchat(chitchat_config, initial, &UdpTransport).await {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = started_tx.send(Err(std::io::Error::other(format!("{e:#}"))));
                        return;
                    }
                };
                // The view holds this node before anyone reads it.
                refresh(&handle, &me, seeded, &view_tx).await;
                let _ = started_tx.send(Ok(()));
                run(&handle, &me, seeded, interval, &view_tx, keys_rx, &leave_rx).await;
                let _ = handle.shutdown().await;
            });
        })?;
        started_rx.recv().map_err(|_| std::io::Error::other("gossip thread died"))??;
        tracing::info!(node = identity.node, generation = identity.generation, %gossip, seeds = ?config.seeds, "gossip started");
        Ok(Self { view, leave, gossip, listen, announce, thread: Some(thread) })
    }

    /// The live view; `borrow()` it for the latest.
    #[must_use]
    pub fn view(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// The gossip address peers use for this node.
    #[must_use]
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip
    }

    /// The bound gossip address (the control plane's TCP listener uses the same one).
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// A handle to publish extra keys about this node.
    #[must_use]
    pub fn announce(&self) -> Announce {
        self.announce.clone()
    }

    /// Announces that this node is leaving, gives the announcement a few gossip rounds to
    /// spread (peers stop counting it as live at once instead of after failure detection),
    /// then stops gossip.
    pub fn leave(mut self) {
        self.leave.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.leave.notify_one();
            let _ = t.join();
        }
    }
}

/// Binds the cluster port's TCP side (the peer listener) on `addr`, where gossip then takes the
/// same port number over UDP.
///
/// Port 0 picks a TCP port that is free over UDP too: the TCP listener is held from here on (so
/// no outgoing connection can take its number, as one could from a port only probed), and a port
/// whose UDP side is taken is tried again with another.
///
/// # Errors
/// When the address cannot be bound, or no port free on both sides is found.
pub fn bind_cluster_port(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    if addr.port() != 0 {
        return std::net::TcpListener::bind(addr);
    }
    let mut last = None;
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind(addr)?;
        match std::net::UdpSocket::bind(tcp.local_addr()?) {
            Ok(_) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free cluster port")))
}

async fn run(
    handle: &chitchat::ChitchatHandle,
    me: &ChitchatId,
    seeded: bool,
    interval: Duration,
    view_tx: &watch::Sender<Arc<View>>,
    mut keys: watch::Receiver<BTreeMap<String, String>>,
    leave: &Notify,
) {
    let chitchat = handle.chitchat();
    let mut live_changes = chitchat.lock().await.live_nodes_watcher();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = leave.notified() => break,
            _ = tick.tick() => {}
            changed = live_changes.changed() => if changed.is_err() { break },
            changed = keys.changed() => {
                if changed.is_err() { break }
                let kvs = keys.borrow_and_update().clone();
                handle.with_chitchat(|c| {
                    for (k, v) in &kvs {
                        c.self_node_state().set(k, v);
                    }
                }).await;
            }
        }
        refresh(handle, me, seeded, view_tx).await;
    }
    chitchat.lock().await.self_node_state().set(key::STATE, LEAVING);
    // Three rounds: each round gossips with a few peers, so most hear it before we go.
    tokio::time::sleep(interval * 3).await;
}

/// Gossips this node's load and publishes the folded view if it changed.
async fn refresh(
    handle: &chitchat::ChitchatHandle,
    me: &ChitchatId,
    seeded: bool,
    view_tx: &watch::Sender<Arc<View>>,
) {
    let view = handle
        .with_chitchat(|c| {
            c.self_node_state().set(key::LOAD, crate::metrics::open_connections());
            let live: Vec<ChitchatId> = c.live_nodes().cloned().collect();
            let live: Vec<&ChitchatId> = live.iter().collect();
            fold(me, seeded, c.node_states().iter(), &live)
        })
        .await;
    publish(view_tx, view);
}

fn publish(tx: &watch::Sender<Arc<View>>, view: View) {
    let old = tx.borrow().clone();
    if *old == view {
        return;
    }
    for m in &view.members {
        match old.members.iter().find(|o| o.id == m.id) {
            None => tracing::info!(
                node = m.id,
                generation = m.generation,
                live = m.live,
                "node discovered"
            ),
            Some(o) if o.generation != m.generation => {
                tracing::info!(
                    node = m.id,
                    generation = m.generation,
                    previous = o.generation,
                    "node restarted"
                );
            }
            Some(o) if o.live && !m.live => {
                tracing::warn!(node = m.id, leaving = m.leaving, "node suspected down");
            }
            Some(o) if !o.live && m.live => tracing::info!(node = m.id, "node up"),
            Some(_) => {}
        }
    }
    metrics::gauge!(crate::metrics::CLUSTER_NODES, "state" => "live").set(view.live() as f64);
    metrics::gauge!(crate::metrics::CLUSTER_NODES, "state" => "down")
        .set((view.members.len() - view.live()) as f64);
    tx.send_replace(Arc::new(view));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(node: &str, generation: u64, port: u16) -> ChitchatId {
        ChitchatId::new(node, generation, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn given_a_fresh_data_dir_when_started_twice_should_keep_the_id_and_count_generations() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load(dir.path(), None).unwrap();
        let second = Identity::load(dir.path(), None).unwrap();
        assert_eq!(first.node, second.node);
        assert_eq!((first.generation, second.generation), (1, 2));
        assert!(first.node > 0);
    }

    #[test]
    fn given_a_data_dir_of_another_node_should_refuse_to_start() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load(dir.path(), Some(1)).unwrap();
        let err = Identity::load(dir.path(), Some(2)).unwrap_err();
        assert!(matches!(err, IdentityError::WrongNode { stored: 1, configured: 2 }), "{err}");
        assert_eq!(Identity::load(dir.path(), Some(1)).unwrap().generation, 2);
    }

    #[test]
    fn given_a_damaged_generation_file_should_refuse_to_start() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load(dir.path(), Some(7)).unwrap();
        std::fs::write(dir.path().join("cluster/generation"), "x9").unwrap();
        assert!(matches!(Identity::load(dir.path(), Some(7)), Err(IdentityError::Damaged { .. })));
    }

    #[test]
    fn given_two_generations_of_a_node_when_folded_should_keep_only_the_newest() {
        let me = cid("1", 1, 1);
        let old = cid("2", 3, 2);
        let new = cid("2", 4, 2);
        let mut states = BTreeMap::new();
        for id in [&me, &old, &new] {
            states.insert(id.clone(), NodeState::for_test());
        }
        // The old incarnation is still "live" to the failure detector: it is dropped anyway.
        let view = fold(&me, true, states.iter(), &[&me, &old]);
        assert_eq!(view.members.len(), 2);
        let two = &view.members[1];
        assert_eq!((two.id, two.generation, two.live), (2, 4, false));
        assert!(!view.joined(), "the newest incarnation has not been heard from as live");
        let view = fold(&me, true, states.iter(), &[&me, &new]);
        assert!(view.joined());
        assert_eq!(view.live(), 2);
    }

    #[test]
    fn given_a_leaving_node_when_folded_should_not_count_it_live() {
        let me = cid("1", 1, 1);
        let other = cid("2", 1, 2);
        let mut states = BTreeMap::new();
        states.insert(me.clone(), NodeState::for_test());
        let mut leaving = NodeState::for_test();
        leaving.set(key::STATE, LEAVING);
        leaving.set(key::TCP, "127.0.0.2:7400");
        states.insert(other.clone(), leaving);
        let view = fold(&me, false, states.iter(), &[&me, &other]);
        let m = &view.members[1];
        assert!(m.leaving && !m.live);
        assert_eq!(m.tcp, Some(SocketAddr::from(([127, 0, 0, 2], 7400))));
        assert!(view.joined(), "a node without seeds founds the cluster");
    }

    #[test]
    fn given_unparsable_node_ids_when_folded_should_ignore_them() {
        let me = cid("1", 1, 1);
        let stranger = cid("not-a-switchboard-node", 1, 2);
        let mut states = BTreeMap::new();
        states.insert(me.clone(), NodeState::for_test());
        states.insert(stranger.clone(), NodeState::for_test());
        let view = fold(&me, false, states.iter(), &[&me, &stranger]);
        assert_eq!(view.members.len(), 1);
    }
}
