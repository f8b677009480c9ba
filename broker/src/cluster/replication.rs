//! The data plane's replication engine: one [`Replica`] per partition this node holds a copy
//! of, driven by the committed partition table, with durable state in fjall and messages to
//! peers over the cluster port.
//!
//! One loop owns every replica. A round takes everything that arrived (peer messages, a new
//! table, a tick), feeds it to the replicas, sends what may leave before this node's fsync
//! (appends, which followers then fsync in parallel), writes what changed (promised epochs,
//! log suffixes) and covers it with **one fsync**, tells the replicas their writes are durable,
//! and only then sends the rest. So a promise is on disk before the `Promised` reply leaves,
//! an acknowledgement never precedes the fsync it reports (the replica emits `Appended` only
//! for a synced prefix, and counts its own log only once synced), and the cost is one fsync
//! per round however many partitions changed (group commit, as in the storage writer).
//!
//! Appointments come from the table: when it names this node leader of a partition in an epoch
//! it has not led yet, the engine calls [`Replica::lead`]; followers learn epochs from their
//! leaders' messages. Entries carry the owners' writes ([`super::dataplane`]): a leader appends
//! the proposals of the partitions it serves, and every replica applies committed entries to
//! its message store through the storage writer, in log order, with the applied index in the
//! same atomic batch. A partition is *serving* once its leader's marker is committed by a
//! majority and everything up to it is applied here; only then do its owners accept writes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use prost::Message as _;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};

use super::NodeId;
use super::dataplane::{DataPlane, Outcome, Proposal, Replayed};
use super::placement::{PARTITION_COUNT, PartitionId};
use super::raft::Machine;
use super::replica::{Durable, Entry, Epoch, Index, Msg, Out, Replica};
use crate::shard::ShardMsg;
use crate::storage::{CommitSink, Committed, Ks, WriteBatch, WriteOp, keys};

/// Peer path that receives replication frames.
pub const PATH: &str = "/replicate";

/// How often leaders still gathering promises retransmit them.
const TICK: Duration = Duration::from_millis(100);

/// Every this many ticks, serving leaders retransmit too (appends not acknowledged, and the
/// commit point). Nothing times out on missing heartbeats (epochs come from the control
/// plane), so an idle partition needs no more: 1,024 partitions ticking every 100 ms cost a
/// busy core in a debug build.
const SERVING_TICK_EVERY: u32 = 10;

/// Inbound frames waiting for the engine; beyond this they are dropped (leaders retransmit).
const INBOX: usize = 256;

/// Outbound frames waiting per peer; beyond this they are dropped (leaders retransmit).
const OUTBOX: usize = 64;

/// A leader that serves a moved partition reports it this often until the table records it.
const SETTLE_REPORT_EVERY: Duration = Duration::from_secs(2);

/// `(partition, epoch)` pairs whose leader serves in a new replica set: the control plane
/// may drop the previous set.
pub type Settled = Vec<(PartitionId, Epoch)>;

mod wire {
    //! The replication frame: every message of one round from one node to another.

    use bytes::Bytes;

    /// One log entry.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Entry {
        /// Epoch of the leader that appended it.
        #[prost(uint64, tag = "1")]
        pub epoch: u64,
        /// Absent for an epoch marker.
        #[prost(bytes = "bytes", optional, tag = "2")]
        pub payload: Option<Bytes>,
    }

    /// One message for one partition; `kind` says which fields mean what.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Msg {
        /// The partition.
        #[prost(uint32, tag = "1")]
        pub partition: u32,
        /// 1 Promise, 2 Promised, 3 Append, 4 Appended, 5 Mismatch, 6 Stale.
        #[prost(uint32, tag = "2")]
        pub kind: u32,
        /// The epoch (the promised one, for Stale).
        #[prost(uint64, tag = "3")]
        pub epoch: u64,
        /// `prev_index` (Append, Mismatch), `index` (Appended) or the base (Promise,
        /// Promised).
        #[prost(uint64, tag = "4")]
        pub index: u64,
        /// `prev_epoch` (Append), the base's epoch (Promise) or the last entry's (Promised).
        #[prost(uint64, tag = "5")]
        pub prev_epoch: u64,
        /// The commit index (Append) or the promiser's committed prefix (Promised).
        #[prost(uint64, tag = "6")]
        pub commit: u64,
        /// The log (Promised) or the entries (Append).
        #[prost(message, repeated, tag = "7")]
        pub entries: Vec<Entry>,
        /// The replica's log length (Mismatch, Promised).
        #[prost(uint64, tag = "8")]
        pub len: u64,
        /// Promised: the entries follow the leader's base (`index`); without it the promiser
        /// does not hold the base and carries no entries.
        #[prost(bool, tag = "9")]
        pub holds_base: bool,
    }

    /// A frame.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Frame {
        /// The sending node.
        #[prost(uint64, tag = "1")]
        pub from: u64,
        /// Its messages.
        #[prost(message, repeated, tag = "2")]
        pub msgs: Vec<Msg>,
    }
}

/// A log entry's payload as a replica holds it: in memory, or (applied, and more than
/// `cluster.log_memory_entries` behind) only in the engine's database, read back when a
/// lagging replica needs it.
#[derive(Debug, Clone)]
pub enum Payload {
    /// In memory.
    Held(Bytes),
    /// On disk only; its length.
    Stored(usize),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Self::Held(b) => b.len(),
            Self::Stored(n) => *n,
        }
    }
}

/// Payloads compare by content when both are in memory, else by length: an entry is
/// identified by its (index, epoch) (one leader per epoch appends an index once); comparing
/// payloads only checks that.
impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Held(a), Self::Held(b)) => a == b,
            _ => self.len() == other.len(),
        }
    }
}

impl super::replica::Weigh for Payload {
    fn weight(&self) -> usize {
        self.len()
    }
}

/// Reads a stored payload back: `(partition, index)` → its bytes.
type LoadPayload<'a> = &'a dyn Fn(PartitionId, Index) -> Option<Bytes>;

/// The wire form of `msg`; `None` when a stored payload it carries cannot be read back (the
/// message is dropped; the protocol retransmits, and the error is logged).
fn to_wire(partition: PartitionId, msg: Msg<Payload>, load: LoadPayload<'_>) -> Option<wire::Msg> {
    let entries = |first: Index, log: Vec<Entry<Payload>>| -> Option<Vec<wire::Entry>> {
        log.into_iter()
            .zip(first..)
            .map(|(e, index)| {
                let payload = match e.payload {
                    None => None,
                    Some(Payload::Held(b)) => Some(b),
                    Some(Payload::Stored(_)) => match load(partition, index) {
                        Some(b) => Some(b),
                        None => {
                            tracing::error!(partition, index, "stored log entry unreadable");
                            return None;
                        }
                    },
                };
                Some(wire::Entry { epoch: e.epoch, payload })
            })
            .collect()
    };
    let mut w = wire::Msg { partition: u32::from(partition), ..wire::Msg::default() };
    match msg {
        Msg::Promise { epoch, base, base_epoch } => {
            w.kind = 1;
            w.epoch = epoch;
            w.index = base;
            w.prev_epoch = base_epoch;
        }
        Msg::Promised { epoch, base, len, last_epoch, commit, after_base } => {
            w.kind = 2;
            w.epoch = epoch;
            w.index = base;
            w.len = len;
            w.prev_epoch = last_epoch;
            w.commit = commit;
            if let Some(log) = after_base {
                w.holds_base = true;
                w.entries = entries(base + 1, log)?;
            }
        }
        Msg::Append { epoch, prev_index, prev_epoch, entries: log, commit } => {
            w.kind = 3;
            w.epoch = epoch;
            w.index = prev_index;
            w.prev_epoch = prev_epoch;
            w.commit = commit;
            w.entries = entries(prev_index + 1, log)?;
        }
        Msg::Appended { epoch, index } => {
            w.kind = 4;
            w.epoch = epoch;
            w.index = index;
        }
        Msg::Mismatch { epoch, prev_index, len } => {
            w.kind = 5;
            w.epoch = epoch;
            w.index = prev_index;
            w.len = len;
        }
        Msg::Stale { promised } => {
            w.kind = 6;
            w.epoch = promised;
        }
    }
    Some(w)
}

/// A decoded message, or `None` for an unknown kind or partition (dropped: the sender
/// retransmits what matters, and a newer peer's extensions must not break an older one).
fn from_wire(mut w: wire::Msg) -> Option<(PartitionId, Msg<Payload>)> {
    let partition = PartitionId::try_from(w.partition).ok()?;
    if usize::from(partition) >= PARTITION_COUNT {
        return None;
    }
    let mut log = || -> Vec<Entry<Payload>> {
        let entries = std::mem::take(&mut w.entries);
        entries
            .into_iter()
            .map(|e| Entry { epoch: e.epoch, payload: e.payload.map(Payload::Held) })
            .collect()
    };
    let msg = match w.kind {
        1 => Msg::Promise { epoch: w.epoch, base: w.index, base_epoch: w.prev_epoch },
        2 => Msg::Promised {
            epoch: w.epoch,
            base: w.index,
            len: w.len,
            last_epoch: w.prev_epoch,
            commit: w.commit,
            after_base: w.holds_base.then(log),
        },
        3 => Msg::Append {
            epoch: w.epoch,
            prev_index: w.index,
            prev_epoch: w.prev_epoch,
            entries: log(),
            commit: w.commit,
        },
        4 => Msg::Appended { epoch: w.epoch, index: w.index },
        5 => Msg::Mismatch { epoch: w.epoch, prev_index: w.index, len: w.len },
        6 => Msg::Stale { promised: w.epoch },
        _ => return None,
    };
    Some((partition, msg))
}

/// One decoded frame: its sender and its messages by partition.
type Batch = (NodeId, Vec<(PartitionId, Msg<Payload>)>);

/// Where peer frames enter the engine.
#[derive(Debug, Clone)]
pub struct Inbox(mpsc::Sender<Batch>);

impl Inbox {
    /// Decodes a frame and queues it; a full queue or a bad frame drops it.
    ///
    /// # Errors
    /// When the frame does not decode.
    pub fn deliver(&self, body: &[u8]) -> Result<(), prost::DecodeError> {
        let frame = wire::Frame::decode(body)?;
        let msgs: Vec<_> = frame.msgs.into_iter().filter_map(from_wire).collect();
        if !msgs.is_empty() && self.0.try_send((frame.from, msgs)).is_err() {
            metrics::counter!(crate::metrics::REPLICATION_DROPPED, "direction" => "in")
                .increment(1);
        }
        Ok(())
    }
}

/// A stored entry's payload, from the log keyspace.
fn stored_payload(log: &Keyspace, p: PartitionId, index: Index) -> Option<Bytes> {
    let v = log.get(log_key(p, index)).ok()??;
    decode_entry(&v)?.payload
}

/// The engine's durable state: its own fjall database (`<data_dir>/replication`).
struct Store {
    db: Database,
    /// `partition ++ index` → `epoch ++ kind ++ payload`.
    log: Keyspace,
    /// `partition` → promised epoch.
    promised: Keyspace,
}

fn log_key(p: PartitionId, index: Index) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..2].copy_from_slice(&p.to_be_bytes());
    k[2..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The stored form of an entry; `None` for one whose payload is only on disk already (never
/// rewritten: only applied entries leave memory, and those are durable and final).
fn encode_entry(e: &Entry<Payload>) -> Option<Vec<u8>> {
    let mut v = Vec::with_capacity(9 + e.payload.as_ref().map_or(0, Payload::len));
    v.extend_from_slice(&e.epoch.to_be_bytes());
    match &e.payload {
        None => v.push(0),
        Some(Payload::Held(p)) => {
            v.push(1);
            v.extend_from_slice(p);
        }
        Some(Payload::Stored(_)) => return None,
    }
    Some(v)
}

fn decode_entry(v: &[u8]) -> Option<Entry<Bytes>> {
    let epoch = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let payload = match v.get(8)? {
        0 => None,
        1 => Some(Bytes::copy_from_slice(v.get(9..)?)),
        _ => return None,
    };
    Some(Entry { epoch, payload })
}

impl Store {
    fn open(data_dir: &std::path::Path) -> Result<Self, fjall::Error> {
        let db = crate::storage::database(&data_dir.join("replication"), 8 << 20, None)?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        let promised = db.keyspace("promised", KeyspaceCreateOptions::default)?;
        Ok(Self { db, log, promised })
    }

    /// Every partition's durable state. Payloads of entries applied (per `applied`) more than
    /// `keep` entries ago stay on disk.
    fn load(
        &self,
        applied: &HashMap<PartitionId, Index>,
        keep: Index,
    ) -> Result<BTreeMap<PartitionId, Durable<Payload>>, String> {
        let mut out: BTreeMap<PartitionId, Durable<Payload>> = BTreeMap::new();
        for kv in self.promised.iter() {
            let (k, v) = kv.into_inner().map_err(|e| e.to_string())?;
            let p = PartitionId::from_be_bytes(k.as_ref().try_into().map_err(|_| "bad key")?);
            let e = Epoch::from_be_bytes(v.as_ref().try_into().map_err(|_| "bad epoch")?);
            out.entry(p).or_default().promised = e;
        }
        for kv in self.log.iter() {
            let (k, v) = kv.into_inner().map_err(|e| e.to_string())?;
            let p = PartitionId::from_be_bytes(
                k.get(..2).and_then(|b| b.try_into().ok()).ok_or("bad key")?,
            );
            let index =
                Index::from_be_bytes(k.get(2..).and_then(|b| b.try_into().ok()).ok_or("bad key")?);
            let entry = decode_entry(&v).ok_or_else(|| format!("damaged entry {p}/{index}"))?;
            let on_disk = index + keep <= applied.get(&p).copied().unwrap_or(0);
            let payload = entry
                .payload
                .map(|b| if on_disk { Payload::Stored(b.len()) } else { Payload::Held(b) });
            let entry = Entry { epoch: entry.epoch, payload };
            let log = &mut out.entry(p).or_default().log;
            if index != log.len() as Index + 1 {
                return Err(format!("gap in the log of partition {p} at {index}"));
            }
            log.push(entry);
        }
        Ok(out)
    }
}

/// One partition this node holds.
struct Slot {
    replica: Replica<Payload>,
    /// Entries `1 ..= evicted` hold their payloads on disk only.
    evicted: Index,
    /// What is on disk: the promised epoch and the log length.
    stored_promise: Epoch,
    stored_len: Index,
    /// The highest epoch this node was appointed leader of (so `lead` is called once).
    appointed: Epoch,
    /// The last index applied to the message store, and the last one handed to the writer.
    applied: Index,
    applying: Index,
    /// Entries this node proposed as leader and has not reported yet: index → who proposed
    /// it, and its writes (applied from here once committed, instead of decoding the entry).
    proposals: BTreeMap<Index, (Origin, Vec<WriteOp>)>,
    /// The epoch this node serves in and the commit index when it started to: writes are
    /// accepted once everything up to that index is applied.
    serve_from: Option<(Epoch, Index)>,
}

/// What to report about one applied entry.
enum Report {
    /// This node proposed it as leader: its owner runs the batch's effects.
    Proposed {
        who: Origin,
        /// How many feed appends it holds (their user_seqs are the owner's).
        feeds: usize,
    },
    /// Another leader (or this node in an earlier epoch) proposed it: delivered here from
    /// what it wrote.
    Replayed(Replayed),
}

/// Who proposed an entry: the owner shard and its token for the batch.
#[derive(Debug, Clone, Copy)]
struct Origin {
    shard: usize,
    token: u64,
}

/// What the engine reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplicationView {
    /// Partitions this node holds a replica of.
    pub replicas: usize,
    /// Partitions it leads (serving or still adopting).
    pub leading: usize,
    /// Partitions it leads and serves (its epoch marker is committed).
    pub serving: usize,
    /// The sum of commit indexes this node knows (grows as entries commit).
    pub committed: u64,
    /// Worst replication lag (entries) of the partitions it leads.
    pub lag: u64,
    /// Committed entries not yet applied here, summed over partitions.
    pub apply_lag: u64,
}

/// The running engine's handles.
pub struct Engine {
    node: NodeId,
    store: Store,
    slots: HashMap<PartitionId, Slot>,
    durable: BTreeMap<PartitionId, Durable<Payload>>,
    inbox: mpsc::Receiver<Batch>,
    peers: HashMap<NodeId, Outbox>,
    client: reqwest::Client,
    view: watch::Sender<ReplicationView>,
    /// The latest committed table.
    table: Arc<Machine>,
    /// Partitions this node no longer replicates: their data is deleted in the next round.
    dropped: Vec<PartitionId>,
    /// Where settled moves are reported, and when each was last reported.
    settle: mpsc::Sender<Settled>,
    reported: HashMap<PartitionId, (Epoch, tokio::time::Instant)>,
    /// Applying committed entries and taking proposals (absent in unit tests).
    data: Option<DataPlane>,
    proposals: Option<mpsc::Receiver<Proposal>>,
    /// The applied index of each partition, as stored (for slots created later).
    applied_at_start: HashMap<PartitionId, Index>,
    /// `(partition, index)` applied, from the storage writer.
    applied_tx: mpsc::UnboundedSender<(PartitionId, Index)>,
    applied_rx: mpsc::UnboundedReceiver<(PartitionId, Index)>,
    /// Applied entries whose payloads stay in memory per partition (the rest are read back
    /// from disk for a replica that lags further).
    log_memory_entries: Index,
}

struct Outbox {
    addr: String,
    tx: mpsc::Sender<Vec<wire::Msg>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("node", &self.node).finish_non_exhaustive()
    }
}

/// Opens the engine's storage and loads every partition's durable state.
///
/// # Errors
/// When the database cannot be opened or holds damaged state.
pub fn open(
    node: NodeId,
    data_dir: &std::path::Path,
    client: reqwest::Client,
    settle: mpsc::Sender<Settled>,
    data: Option<(DataPlane, mpsc::Receiver<Proposal>)>,
    log_memory_entries: Index,
) -> Result<(Engine, Inbox, watch::Receiver<ReplicationView>), String> {
    let store = Store::open(data_dir).map_err(|e| e.to_string())?;
    let applied_at_start = match &data {
        Some((d, _)) => d.storage.applied().map_err(|e| e.to_string())?,
        None => HashMap::new(),
    };
    let durable = store.load(&applied_at_start, log_memory_entries)?;
    let (data, proposals) = data.map_or((None, None), |(d, rx)| (Some(d), Some(rx)));
    let (applied_tx, applied_rx) = mpsc::unbounded_channel();
    let (tx, inbox) = mpsc::channel(INBOX);
    let (view, view_rx) = watch::channel(ReplicationView::default());
    let engine = Engine {
        node,
        store,
        slots: HashMap::new(),
        durable,
        inbox,
        peers: HashMap::new(),
        client,
        view,
        table: Arc::default(),
        dropped: Vec::new(),
        settle,
        reported: HashMap::new(),
        data,
        proposals,
        applied_at_start,
        applied_tx,
        applied_rx,
        log_memory_entries,
    };
    Ok((engine, Inbox(tx), view_rx))
}

impl Engine {
    /// Runs until `stop` is notified.
    pub async fn run(mut self, mut table: watch::Receiver<Arc<Machine>>, stop: Arc<Notify>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        // The table loaded from disk counts as seen by this receiver: follow it now, or a
        // node that restarts into an unchanged table would know no peers and lead nothing.
        let mut first = Vec::new();
        let machine = table.borrow_and_update().clone();
        self.follow(&machine, &mut first);
        self.table = machine;
        let mut pending = Some(first);
        loop {
            let mut outs: Vec<(PartitionId, Out<Payload>)> = pending.take().unwrap_or_default();
            tokio::select! {
                () = stop.notified() => return self.fail_everything(),
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    let all = ticks.is_multiple_of(SERVING_TICK_EVERY);
                    for (&p, slot) in &mut self.slots {
                        let r = &mut slot.replica;
                        if r.leading().is_none() || (!all && r.serving().is_some()) {
                            continue;
                        }
                        outs.extend(r.tick().into_iter().map(|o| (p, o)));
                    }
                }
                r = table.changed() => {
                    if r.is_err() { return self.fail_everything() }
                    let machine = table.borrow_and_update().clone();
                    self.follow(&machine, &mut outs);
                    self.table = machine;
                }
                batch = self.inbox.recv() => {
                    let Some(batch) = batch else { return self.fail_everything() };
                    self.receive(batch, &mut outs);
                }
                Some(proposal) = next(&mut self.proposals) => self.propose(proposal, &mut outs),
                Some((p, index)) = self.applied_rx.recv() => self.on_applied(p, index),
            }
            // Everything else that already arrived joins this round.
            while let Ok(batch) = self.inbox.try_recv() {
                self.receive(batch, &mut outs);
            }
            while let Some(proposal) = self.proposals.as_mut().and_then(|rx| rx.try_recv().ok()) {
                self.propose(proposal, &mut outs);
            }
            while let Ok((p, index)) = self.applied_rx.try_recv() {
                self.on_applied(p, index);
            }
            // Only a promise must be on disk before its reply leaves: appends (their entries
            // count for this node only once `synced` says so; an acknowledgement is emitted
            // only for a synced prefix) and everything else go now, so followers fsync while
            // this node does, instead of after it.
            let (late, early): (Vec<_>, Vec<_>) = outs
                .into_iter()
                .partition(|(_, o)| matches!(o, Out::Send { msg: Msg::Promised { .. }, .. }));
            self.dispatch(early);
            let mut outs = late;
            if let Err(e) = self.persist(&mut outs).await {
                // The promise or log could not be made durable: nothing more of this round
                // may leave. The replicas' in-memory state ran ahead of the disk, so stop
                // here. Stopping only the engine would leave a node that gossip shows live and
                // Raft keeps as a voter, so its partitions would never fail over: fail-stop.
                tracing::error!(error = %e, "replication storage failed; stopping the process");
                std::process::abort();
            }
            self.dispatch(outs);
            self.report_settled();
            self.publish();
        }
    }

    /// Follows the committed table: a slot for every partition this node replicates, and a
    /// leadership round for every new epoch it is appointed to lead.
    fn follow(&mut self, machine: &Machine, outs: &mut Vec<(PartitionId, Out<Payload>)>) {
        for (id, node) in machine.membership.membership().nodes() {
            if *id != self.node && !self.peers.contains_key(id) {
                let (tx, rx) = mpsc::channel(OUTBOX);
                tokio::spawn(send_loop(self.client.clone(), node.addr.clone(), self.node, rx));
                self.peers.insert(*id, Outbox { addr: node.addr.clone(), tx });
            }
        }
        let me = self.node;
        for (p, a) in machine.table.partitions.iter().enumerate() {
            let Ok(p) = PartitionId::try_from(p) else { continue };
            // Every partition's leader, also of those this node does not hold: its owners
            // forward requests there.
            if let Some(d) = &self.data {
                d.partitions.set_leader(p, a.leader);
            }
            if !a.replicas.contains(&me) && !a.previous.contains(&me) {
                // Moved away and settled: this copy is no longer part of any majority. Its log
                // goes; its promise stays (on disk and here), so a copy created again later
                // still refuses the epochs it fenced.
                let promised = match (self.slots.remove(&p), self.durable.remove(&p)) {
                    (Some(slot), _) => {
                        if let Some(d) = &self.data {
                            d.partitions.set_serving(p, None);
                        }
                        // Created again later, it resumes applying after what was handed to
                        // the writer (which applies in order; a failure stops the broker).
                        self.applied_at_start.insert(p, slot.applying);
                        self.fail(slot.proposals.into_values().map(|(who, _)| who));
                        Some(slot.replica.promised())
                    }
                    (None, Some(d)) => Some(d.promised),
                    (None, None) => None,
                };
                if let Some(promised) = promised {
                    self.durable.insert(p, Durable { promised, ..Durable::default() });
                    self.dropped.push(p);
                }
                continue;
            }
            let slot = self.slot(p);
            if a.leader == me && a.epoch > slot.appointed {
                slot.appointed = a.epoch;
                let set: BTreeSet<NodeId> = a.replicas.iter().copied().collect();
                let old: BTreeSet<NodeId> = a.previous.iter().copied().collect();
                let led = slot.replica.lead(a.epoch, set, old);
                outs.extend(led.into_iter().map(|o| (p, o)));
            } else if a.leader == me && a.epoch == slot.appointed && a.previous.is_empty() {
                // The move this epoch made is recorded settled: commits need the new set only.
                let settled = slot.replica.settle(a.epoch);
                outs.extend(settled.into_iter().map(|o| (p, o)));
            }
        }
    }

    /// Whether a message for `p` in `epoch` concerns this node: it replicates `p` per the
    /// table, or the message comes from an epoch the table it has applied does not know yet.
    fn concerns(&self, p: PartitionId, epoch: Epoch) -> bool {
        match self.table.table.partitions.get(usize::from(p)) {
            None => true,
            Some(a) => {
                a.replicas.contains(&self.node)
                    || a.previous.contains(&self.node)
                    || epoch > a.epoch
            }
        }
    }

    /// Reports moved partitions this node leads and serves in their new set.
    fn report_settled(&mut self) {
        let now = tokio::time::Instant::now();
        let mut settled = Vec::new();
        for (p, a) in self.table.table.partitions.iter().enumerate() {
            let Ok(p) = PartitionId::try_from(p) else { continue };
            if a.previous.is_empty() || a.leader != self.node {
                continue;
            }
            let Some(slot) = self.slots.get(&p) else { continue };
            if slot.replica.serving() != Some(a.epoch) {
                continue;
            }
            let due = self.reported.get(&p).is_none_or(|&(e, at)| {
                e != a.epoch || now.duration_since(at) >= SETTLE_REPORT_EVERY
            });
            if due {
                self.reported.insert(p, (a.epoch, now));
                settled.push((p, a.epoch));
            }
        }
        if !settled.is_empty() {
            let _ = self.settle.try_send(settled);
        }
    }

    fn slot(&mut self, p: PartitionId) -> &mut Slot {
        let (node, durable) = (self.node, &mut self.durable);
        let applied = self.applied_at_start.get(&p).copied().unwrap_or(0);
        self.slots.entry(p).or_insert_with(|| {
            // The applied index is committed: promises this replica asks for as a leader
            // continue from there.
            let d = Durable { committed: applied, ..durable.remove(&p).unwrap_or_default() };
            let (stored_promise, stored_len) = (d.promised, d.log.len() as Index);
            let evicted = d
                .log
                .iter()
                .rposition(|e| matches!(e.payload, Some(Payload::Stored(_))))
                .map_or(0, |i| i as Index + 1);
            Slot {
                replica: Replica::recover(node, d),
                evicted,
                stored_promise,
                stored_len,
                appointed: 0,
                applied,
                applying: applied,
                proposals: BTreeMap::new(),
                serve_from: None,
            }
        })
    }

    /// Appends an owner's proposal to its partition's log, if this node serves the epoch the
    /// owner accepted it in; otherwise fails it back.
    fn propose(&mut self, prop: Proposal, outs: &mut Vec<(PartitionId, Out<Payload>)>) {
        let who = Origin { shard: prop.shard, token: prop.token };
        let serving = self.data.as_ref().and_then(|d| d.partitions.serving(prop.partition));
        let slot = self.slots.get_mut(&prop.partition).filter(|_| serving == Some(prop.epoch));
        match slot.map(|slot| (slot.replica.append(Payload::Held(prop.payload)), slot)) {
            Some((Ok((index, o)), slot)) => {
                slot.proposals.insert(index, (who, prop.ops));
                outs.extend(o.into_iter().map(|o| (prop.partition, o)));
            }
            _ => self.fail([who]),
        }
    }

    /// The engine stops: nothing more commits here, so every proposal it holds or has queued
    /// is reported failed (owners waiting on them answer their clients).
    fn fail_everything(&mut self) {
        let mut all: Vec<Origin> = self
            .slots
            .values_mut()
            .flat_map(|s| std::mem::take(&mut s.proposals).into_values().map(|(who, _)| who))
            .collect();
        if let Some(rx) = self.proposals.as_mut() {
            rx.close();
            while let Ok(p) = rx.try_recv() {
                all.push(Origin { shard: p.shard, token: p.token });
            }
        }
        self.fail(all);
    }

    /// Reports proposals failed to their owner shards.
    fn fail(&self, who: impl IntoIterator<Item = Origin>) {
        let Some(data) = &self.data else { return };
        for who in who {
            data.report(who.shard, who.token, Outcome::Failed);
        }
    }

    /// Hands committed entries `applying + 1 ..= commit` to the storage writer as one batch,
    /// with the new applied index. Once durable there, the writer's thread reports each of
    /// this node's proposals among them to its owner shard, and the index to the engine.
    fn apply(&mut self, p: PartitionId, commit: Index) {
        let Some(data) = &self.data else { return };
        let Some(slot) = self.slots.get_mut(&p) else { return };
        // Only what this replica's own log holds durably: the applied index (written by the
        // storage writer, which does not wait for the replication log's fsync) then never
        // names an entry that a crash could take back or leave stale in the log on disk, and
        // recovery may take it as committed. A follower learns of commits before its own
        // fsync; the rest is applied after it (`persist`).
        let commit = commit.min(slot.replica.durable_prefix());
        if commit <= slot.applying {
            return;
        }
        let mut ops = Vec::new();
        let mut reports: Vec<Report> = Vec::new();
        for index in slot.applying + 1..=commit {
            let Some(entry) = slot.replica.log().get(index as usize - 1) else { break };
            // This node's own entries are applied from the writes it proposed; others'
            // are decoded from the log.
            if let Some((who, own)) = slot.proposals.remove(&index) {
                let feeds =
                    own.iter().filter(|op| matches!(op, WriteOp::FeedAppend { .. })).count();
                reports.push(Report::Proposed { who, feeds });
                // Fault injection (tests of anti-entropy): this leader loses the messages of
                // the entries it proposed (its acks and deliveries still happen).
                #[cfg(feature = "failpoints")]
                let own = if fail::eval("leader-drop-messages", |_| ()).is_some() {
                    own.into_iter()
                        .filter(|op| !matches!(op, WriteOp::Put(Ks::Messages, ..)))
                        .collect()
                } else {
                    own
                };
                ops.extend(own);
                continue;
            }
            let decoded = match &entry.payload {
                None => continue,
                Some(Payload::Held(b)) => crate::storage::decode_ops(b).map_err(|e| e.to_string()),
                // Only applied entries leave memory (`on_applied`), never one still to apply.
                Some(Payload::Stored(_)) => Err("payload no longer in memory".to_owned()),
            };
            let decoded = match decoded {
                Ok(ops) => ops,
                Err(e) => {
                    // A committed entry is damaged: applying around it would diverge.
                    tracing::error!(partition = p, index, error = %e, "committed entry damaged; stopping the process");
                    std::process::abort();
                }
            };
            reports.push(Report::Replayed(Replayed::of(&decoded)));
            ops.extend(decoded);
            // Fault injection (tests of anti-entropy): this replica loses the messages of
            // entries it applies without having proposed them.
            #[cfg(feature = "failpoints")]
            if fail::eval("replica-drop-messages", |_| ()).is_some() {
                ops.retain(|op| !matches!(op, WriteOp::Put(Ks::Messages, ..)));
            }
        }
        // Feed appends get node-local user_seqs in apply order, which a re-apply after a crash
        // may not repeat: a batch holding any is fsynced before its events are shown.
        let fsync = ops.iter().any(|op| matches!(op, WriteOp::FeedAppend { .. }));
        ops.push(WriteOp::Put(Ks::Meta, keys::applied_key(p), commit.to_be_bytes().to_vec()));
        slot.applying = commit;
        let proposed: Vec<Origin> = reports
            .iter()
            .filter_map(|r| match r {
                Report::Proposed { who, .. } => Some(*who),
                Report::Replayed(_) => None,
            })
            .collect();
        let shards = data.shards.clone();
        let applied = self.applied_tx.clone();
        let owner = crate::shard::owner_shard(p, shards.len());
        // The writer calls the sink once: the reports move out instead of being cloned.
        let reports = std::sync::Mutex::new(reports);
        let sink: CommitSink = Arc::new(move |c: Committed| {
            let reports = std::mem::take(
                &mut *reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            // An error poisoned the store and the broker stops; the owners fail what waits.
            let ok = c.result.is_ok();
            let mut seqs = c.result.unwrap_or_default().into_iter();
            // On the writer thread: blocking only delays the next commit round. Everything
            // goes to the partition's owner shard, in log order.
            let send = |msg| {
                if let Some(tx) = shards.get(owner) {
                    let _ = tx.blocking_send(msg);
                }
            };
            let mut replayed = Replayed::default();
            for report in reports {
                match report {
                    Report::Proposed { who, feeds } => {
                        let mine: Vec<u64> = seqs.by_ref().take(feeds).collect();
                        if !replayed.is_empty() {
                            send(ShardMsg::Replayed(Box::new(std::mem::take(&mut replayed))));
                        }
                        let outcome = if ok { Outcome::Applied(mine) } else { Outcome::Failed };
                        send(ShardMsg::Replicated { token: who.token, outcome });
                    }
                    Report::Replayed(r) => {
                        replayed.messages.extend(r.messages);
                        for (user, mut event) in r.feeds {
                            event.user_seq = seqs.next().unwrap_or(0);
                            replayed.feeds.push((user, event));
                        }
                    }
                }
            }
            if ok {
                if !replayed.is_empty() {
                    send(ShardMsg::Replayed(Box::new(replayed)));
                }
                let _ = applied.send((p, commit));
            }
        });
        if data.writer.submit(WriteBatch { token: u64::from(p), ops, sink, fsync }).is_err() {
            // The writer is gone (the broker is stopping). Not through the sink: it blocks.
            tracing::error!(partition = p, "storage writer gone; committed entries not applied");
            self.fail(proposed);
        }
    }

    fn on_applied(&mut self, p: PartitionId, index: Index) {
        if let Some(slot) = self.slots.get_mut(&p) {
            metrics::counter!(crate::metrics::REPLICATION_APPLIED)
                .increment(index.saturating_sub(slot.applied));
            slot.applied = slot.applied.max(index);
            // Applied and durable in the log: the payload can leave memory (kept for the
            // last `log_memory_entries`, which a follower catching up usually needs).
            let upto = slot
                .applied
                .min(slot.replica.durable_prefix())
                .saturating_sub(self.log_memory_entries);
            if upto > slot.evicted {
                slot.replica.map_payloads(slot.evicted + 1, upto, |pl| Payload::Stored(pl.len()));
                slot.evicted = upto;
            }
        }
    }

    fn receive(&mut self, (from, msgs): Batch, outs: &mut Vec<(PartitionId, Out<Payload>)>) {
        for (p, msg) in msgs {
            let epoch = match &msg {
                Msg::Promise { epoch, .. }
                | Msg::Promised { epoch, .. }
                | Msg::Append { epoch, .. }
                | Msg::Appended { epoch, .. }
                | Msg::Mismatch { epoch, .. } => *epoch,
                Msg::Stale { promised } => *promised,
            };
            if !self.concerns(p, epoch) {
                continue;
            }
            // A partition this node does not hold yet (a table it has not applied names it):
            // creating the slot lets it promise and follow right away.
            let slot = self.slot(p);
            outs.extend(slot.replica.handle(from, msg).into_iter().map(|o| (p, o)));
        }
    }

    /// Writes every changed promise and log suffix, fsyncs once, and tells the replicas.
    async fn persist(&mut self, outs: &mut Vec<(PartitionId, Out<Payload>)>) -> Result<(), String> {
        let mut batch = self.store.db.batch();
        let mut dirty = Vec::new();
        let dropped = std::mem::take(&mut self.dropped);
        for &p in &dropped {
            for kv in self.store.log.prefix(p.to_be_bytes()) {
                batch.remove(&self.store.log, kv.key().map_err(|e| e.to_string())?);
            }
        }
        for (&p, slot) in &mut self.slots {
            let r = &slot.replica;
            let len = r.log().len() as Index;
            if r.promised() == slot.stored_promise && !r.needs_sync() && len == slot.stored_len {
                continue;
            }
            if r.promised() != slot.stored_promise {
                batch.insert(&self.store.promised, p.to_be_bytes(), r.promised().to_be_bytes());
            }
            let keep = r.durable_prefix().min(len);
            for index in keep + 1..=slot.stored_len.max(len) {
                match r.log().get(index as usize - 1) {
                    Some(e) => {
                        let v = encode_entry(e).ok_or_else(|| {
                            format!("partition {p}: entry {index} to rewrite has left memory")
                        })?;
                        batch.insert(&self.store.log, log_key(p, index), v);
                    }
                    None => batch.remove(&self.store.log, log_key(p, index)),
                }
            }
            dirty.push(p);
        }
        if dirty.is_empty() && dropped.is_empty() {
            return Ok(());
        }
        batch.commit().map_err(|e| e.to_string())?;
        let db = self.store.db.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || db.persist(PersistMode::SyncData))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        metrics::histogram!(crate::metrics::REPLICATION_SYNC_SECONDS)
            .record(started.elapsed().as_secs_f64());
        for p in dirty {
            if let Some(slot) = self.slots.get_mut(&p) {
                slot.stored_promise = slot.replica.promised();
                slot.stored_len = slot.replica.log().len() as Index;
                outs.extend(slot.replica.synced().into_iter().map(|o| (p, o)));
                // What was committed before this fsync made it durable here.
                let commit = slot.replica.commit_index();
                self.apply(p, commit);
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, outs: Vec<(PartitionId, Out<Payload>)>) {
        let log = self.store.log.clone();
        let reads = metrics::counter!(crate::metrics::REPLICATION_DISK_READS);
        let load = move |p: PartitionId, index: Index| {
            reads.increment(1);
            stored_payload(&log, p, index)
        };
        let mut frames: HashMap<NodeId, Vec<wire::Msg>> = HashMap::new();
        let mut announce = Vec::new();
        for (p, out) in outs {
            match out {
                Out::Send { to, msg } => {
                    if let Some(w) = to_wire(p, msg, &load) {
                        frames.entry(to).or_default().push(w);
                    }
                }
                Out::Committed(index) => {
                    self.apply(p, index);
                    announce.push(p);
                }
                Out::SteppedDown => {
                    metrics::counter!(crate::metrics::REPLICATION_STEP_DOWNS).increment(1);
                    if let Some(d) = &self.data {
                        d.partitions.set_serving(p, None);
                    }
                    if let Some(slot) = self.slots.get_mut(&p) {
                        let pending = std::mem::take(&mut slot.proposals);
                        self.fail(pending.into_values().map(|(who, _)| who));
                    }
                }
            }
        }
        // Followers learn a leader's new commit point in this round's frames, so they apply
        // and deliver it now.
        for p in announce {
            let Some(slot) = self.slots.get_mut(&p) else { continue };
            if slot.replica.leading().is_none() {
                continue;
            }
            for out in slot.replica.announce_commit() {
                if let Out::Send { to, msg } = out
                    && let Some(w) = to_wire(p, msg, &load)
                {
                    frames.entry(to).or_default().push(w);
                }
            }
        }
        for (to, msgs) in frames {
            match self.peers.get(&to) {
                Some(outbox) => {
                    if outbox.tx.try_send(msgs).is_err() {
                        metrics::counter!(crate::metrics::REPLICATION_DROPPED, "direction" => "out")
                            .increment(1);
                    }
                }
                None => tracing::debug!(to, "no address for replication peer yet"),
            }
        }
    }

    fn publish(&mut self) {
        let mut v = ReplicationView { replicas: self.slots.len(), ..ReplicationView::default() };
        let (mut lag, mut apply_lag) = (0, 0);
        for (&p, slot) in &mut self.slots {
            let r = &slot.replica;
            lag = lag.max(r.lag().unwrap_or(0));
            apply_lag += r.commit_index().saturating_sub(slot.applied);
            let serving = match r.serving() {
                Some(e) => {
                    if slot.serve_from.is_none_or(|(epoch, _)| epoch != e) {
                        slot.serve_from = Some((e, r.commit_index()));
                    }
                    let from = slot.serve_from.map_or(0, |(_, index)| index);
                    (self.data.is_none() || slot.applied >= from).then_some(e)
                }
                None => {
                    slot.serve_from = None;
                    None
                }
            };
            if let Some(d) = &self.data {
                d.partitions.set_serving(p, serving);
            }
            v.leading += usize::from(r.leading().is_some());
            v.serving += usize::from(serving.is_some());
            v.committed += r.commit_index();
        }
        metrics::gauge!(crate::metrics::CLUSTER_PARTITIONS_SERVING).set(v.serving as f64);
        metrics::gauge!(crate::metrics::REPLICATION_LAG).set(lag as f64);
        metrics::gauge!(crate::metrics::REPLICATION_APPLY_LAG).set(apply_lag as f64);
        v.lag = lag;
        v.apply_lag = apply_lag;
        self.view.send_if_modified(|old| {
            let changed = *old != v;
            *old = v;
            changed
        });
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// The next item of an optional receiver; never resolves without one.
async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Largest frame body sent to a peer (short of the peer server's 16 MiB body limit): messages
/// beyond it go in the next POST. A larger message is sent alone.
const MAX_FRAME_BYTES: usize = 8 << 20;

/// Messages waiting for a POST to one peer, with their encoded sizes.
#[derive(Default)]
struct FrameQueue {
    msgs: std::collections::VecDeque<(usize, wire::Msg)>,
    bytes: usize,
}

impl FrameQueue {
    fn push(&mut self, msgs: Vec<wire::Msg>) {
        for m in msgs {
            let size = prost::Message::encoded_len(&m);
            self.bytes += size;
            self.msgs.push_back((size, m));
        }
    }

    /// The next frame's messages, in order: up to [`MAX_FRAME_BYTES`], at least one.
    fn next_frame(&mut self) -> Vec<wire::Msg> {
        let mut out = Vec::new();
        let mut size = 0;
        while let Some(&(n, _)) = self.msgs.front() {
            if !out.is_empty() && size + n > MAX_FRAME_BYTES {
                break;
            }
            size += n;
            self.bytes -= n;
            out.extend(self.msgs.pop_front().map(|(_, m)| m));
        }
        out
    }
}

/// Sends frames to one peer in order, merging whatever queued up while the previous POST was
/// in flight, up to [`MAX_FRAME_BYTES`] per POST. A failed POST is dropped: the protocol
/// retransmits on its ticks.
async fn send_loop(
    client: reqwest::Client,
    addr: String,
    from: NodeId,
    mut rx: mpsc::Receiver<Vec<wire::Msg>>,
) {
    let mut queue = FrameQueue::default();
    loop {
        if queue.msgs.is_empty() {
            let Some(msgs) = rx.recv().await else { return };
            queue.push(msgs);
        }
        // Only about a frame's worth leaves the channel: a slow peer fills it, and the engine
        // then drops frames (retransmitted later) rather than queueing without bound here.
        while queue.bytes < MAX_FRAME_BYTES {
            match rx.try_recv() {
                Ok(more) => queue.push(more),
                Err(_) => break,
            }
        }
        let body = wire::Frame { from, msgs: queue.next_frame() }.encode_to_vec();
        super::raft::post_protobuf(&client, &addr, PATH, body, Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_queued_messages_beyond_a_frame_should_split_them_in_order_and_send_a_large_one_alone()
    {
        let msg = |partition: u32, bytes: usize| wire::Msg {
            partition,
            kind: 3,
            entries: vec![wire::Entry { epoch: 1, payload: Some(Bytes::from(vec![0u8; bytes])) }],
            ..wire::Msg::default()
        };
        let mut q = FrameQueue::default();
        let third = MAX_FRAME_BYTES / 3;
        q.push(vec![msg(1, third), msg(2, third), msg(3, third)]);
        q.push(vec![msg(4, MAX_FRAME_BYTES * 2), msg(5, 10)]);
        let frames: Vec<Vec<u32>> = std::iter::from_fn(|| {
            let f = q.next_frame();
            (!f.is_empty()).then(|| f.iter().map(|m| m.partition).collect())
        })
        .collect();
        assert_eq!(frames, vec![vec![1, 2], vec![3], vec![4], vec![5]]);
        assert_eq!(q.bytes, 0);
    }

    #[test]
    fn given_every_message_kind_should_survive_the_wire() {
        let e = |epoch, p: Option<&'static str>| Entry {
            epoch,
            payload: p.map(|p| Payload::Held(Bytes::from(p))),
        };
        let msgs = vec![
            Msg::Promise { epoch: 3, base: 7, base_epoch: 2 },
            Msg::Promised {
                epoch: 3,
                base: 7,
                len: 9,
                last_epoch: 3,
                commit: 6,
                after_base: Some(vec![e(1, Some("a")), e(3, None)]),
            },
            Msg::Promised { epoch: 3, base: 7, len: 4, last_epoch: 1, commit: 2, after_base: None },
            Msg::Append {
                epoch: 4,
                prev_index: 2,
                prev_epoch: 3,
                entries: vec![e(4, None), e(4, Some(""))],
                commit: 2,
            },
            Msg::Appended { epoch: 4, index: 9 },
            Msg::Mismatch { epoch: 4, prev_index: 7, len: 5 },
            Msg::Stale { promised: 8 },
        ];
        for m in msgs {
            let wire = to_wire(1023, m.clone(), &|_, _| None).unwrap();
            let frame = wire::Frame { from: 2, msgs: vec![wire] };
            let back = wire::Frame::decode(frame.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back.from, 2);
            let (p, decoded) = from_wire(back.msgs[0].clone()).unwrap();
            assert_eq!((p, decoded), (1023, m));
        }
    }

    #[test]
    fn given_an_unknown_kind_or_partition_should_drop_the_message() {
        let unknown = wire::Msg { kind: 99, ..wire::Msg::default() };
        assert!(from_wire(unknown).is_none());
        let outside = to_wire(0, Msg::Promise { epoch: 1, base: 0, base_epoch: 0 }, &|_, _| None);
        let outside = outside.unwrap();
        assert!(from_wire(wire::Msg { partition: 1024, ..outside }).is_none());
    }

    #[test]
    fn given_entries_should_encode_markers_and_payloads_apart() {
        let held = Entry { epoch: 7, payload: Some(Payload::Held(Bytes::from("p"))) };
        let decoded = decode_entry(&encode_entry(&held).unwrap()).unwrap();
        assert_eq!(decoded, Entry { epoch: 7, payload: Some(Bytes::from("p")) });
        let marker = Entry { epoch: 7, payload: None };
        assert_eq!(
            decode_entry(&encode_entry(&marker).unwrap()),
            Some(Entry { epoch: 7, payload: None })
        );
        let stored = Entry { epoch: 7, payload: Some(Payload::Stored(1)) };
        assert_eq!(encode_entry(&stored), None, "a payload only on disk is never rewritten");
        assert_eq!(decode_entry(&[0; 8]), None);
        assert_eq!(decode_entry(&[0, 0, 0, 0, 0, 0, 0, 1, 2]), None);
    }

    /// Node 1's engine over `dir` (nothing is sent: no table names peers).
    fn node_one(dir: &std::path::Path) -> Engine {
        let client = crate::cluster::raft::peer_client(None).unwrap();
        open(1, dir, client, mpsc::channel(1).0, None, 2).unwrap().0
    }

    #[tokio::test]
    async fn given_a_restart_should_recover_promises_and_logs_and_rewrite_truncated_suffixes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut engine = node_one(dir.path());
            let slot = engine.slot(5);
            // A follower accepts an append of three entries in epoch 2.
            let entries = vec![
                Entry { epoch: 2, payload: None },
                Entry { epoch: 2, payload: Some(Payload::Held(Bytes::from("x"))) },
                Entry { epoch: 2, payload: Some(Payload::Held(Bytes::from("y"))) },
            ];
            let append = Msg::Append { epoch: 2, prev_index: 0, prev_epoch: 0, entries, commit: 0 };
            slot.replica.handle(9, append);
            let mut outs = Vec::new();
            engine.persist(&mut outs).await.unwrap();
            assert!(outs.iter().any(|(p, o)| *p == 5
                && matches!(o, Out::Send { to: 9, msg: Msg::Appended { epoch: 2, index: 3 } })));
            // A newer leader truncates the suffix after the marker.
            let slot = engine.slot(5);
            let replace = Msg::Append {
                epoch: 3,
                prev_index: 1,
                prev_epoch: 2,
                entries: vec![Entry { epoch: 3, payload: None }],
                commit: 0,
            };
            slot.replica.handle(8, replace);
            engine.persist(&mut Vec::new()).await.unwrap();
        }
        let mut engine = node_one(dir.path());
        let r = &engine.slot(5).replica;
        assert_eq!(r.promised(), 3);
        let epochs: Vec<Epoch> = r.log().iter().map(|e| e.epoch).collect();
        assert_eq!(epochs, [2, 3], "the truncated entry is gone from disk");
    }

    #[tokio::test]
    async fn given_applied_entries_should_leave_memory_and_be_read_back_when_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = node_one(dir.path());
        let entries: Vec<Entry<Payload>> = (0..6u8)
            .map(|i| Entry { epoch: 2, payload: Some(Payload::Held(Bytes::from(vec![i; 3]))) })
            .collect();
        let append = Msg::Append { epoch: 2, prev_index: 0, prev_epoch: 0, entries, commit: 6 };
        let _ = engine.slot(5).replica.handle(9, append);
        engine.persist(&mut Vec::new()).await.unwrap();
        // Applied up to 5: entries 1..=3 leave memory (2 stay, per `node_one`).
        engine.on_applied(5, 5);
        let held: Vec<bool> = engine.slots[&5]
            .replica
            .log()
            .iter()
            .map(|e| matches!(e.payload, Some(Payload::Held(_))))
            .collect();
        assert_eq!(held, [false, false, false, true, true, true]);
        // A promise from this replica carries them, read back from disk.
        let promise = Msg::Promise { epoch: 3, base: 0, base_epoch: 0 };
        let outs = engine.slot(5).replica.handle(8, promise);
        let Some(Out::Send { msg, .. }) = outs.into_iter().find(|o| matches!(o, Out::Send { .. }))
        else {
            panic!("no promise")
        };
        let log = engine.store.log.clone();
        let w = to_wire(5, msg, &|p, i| stored_payload(&log, p, i)).unwrap();
        let payloads: Vec<Bytes> = w.entries.into_iter().filter_map(|e| e.payload).collect();
        assert_eq!(payloads, (0..6u8).map(|i| Bytes::from(vec![i; 3])).collect::<Vec<_>>());
        // After a restart they stay on disk.
        drop((engine, log));
        let dir2 = dir.path().to_path_buf();
        let applied = HashMap::from([(5, 5)]);
        let store = Store::open(&dir2).unwrap();
        let durable = store.load(&applied, 2).unwrap();
        let held: Vec<bool> =
            durable[&5].log.iter().map(|e| matches!(e.payload, Some(Payload::Held(_)))).collect();
        assert_eq!(held, [false, false, false, true, true, true]);
    }

    #[tokio::test]
    async fn given_a_partition_moved_away_should_drop_its_log_but_keep_its_promise() {
        use crate::cluster::control::{Assignment, Table};
        let dir = tempfile::tempdir().unwrap();
        let mut engine = node_one(dir.path());
        let append = Msg::Append {
            epoch: 4,
            prev_index: 0,
            prev_epoch: 0,
            entries: vec![Entry { epoch: 4, payload: None }],
            commit: 0,
        };
        engine.slot(7).replica.handle(2, append);
        engine.persist(&mut Vec::new()).await.unwrap();
        let elsewhere = Assignment {
            epoch: 5,
            leader: 2,
            generation: 1,
            replicas: vec![2, 3, 4],
            previous: Vec::new(),
        };
        let machine = Machine {
            table: Table { partitions: vec![elsewhere; PARTITION_COUNT], ..Table::default() },
            ..Machine::default()
        };
        engine.follow(&machine, &mut Vec::new());
        engine.persist(&mut Vec::new()).await.unwrap();
        assert!(engine.slots.is_empty());
        // Created again (say, a move back): the log is gone, the fence is not.
        let r = &engine.slot(7).replica;
        assert_eq!((r.promised(), r.log().len()), (4, 0));
        drop(engine);
        let mut reopened = node_one(dir.path());
        let r = &reopened.slot(7).replica;
        assert_eq!((r.promised(), r.log().len()), (4, 0), "after a restart too");
    }
}
