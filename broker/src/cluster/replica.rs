//! Replication of one partition's log: epoch-fenced primary-backup, sans I/O.
//!
//! This is the rule of the cluster design (`docs/cluster.md`), as a state machine
//! that takes messages, ticks and "your writes are durable" notices, and returns the messages
//! to send and the entries that became committed. Storage, the network and the control plane
//! (which allocates epochs through Raft) are the caller's; a deterministic simulator drives
//! this module through lossy networks, crashes and epoch changes (`cluster::sim`, tests).
//!
//! ## The rule, and why each step is there
//! 1. **Epochs come only from the control plane.** Epoch `e` names one leader and one replica
//!    set `S`. Two leaders of the same epoch cannot exist.
//! 2. **Promises are durable and fence.** A replica stores the highest epoch it has promised
//!    (synchronously: the promise is on disk before the reply leaves) and rejects promises and
//!    appends of lower epochs. A superseded leader can therefore never again gather a majority:
//!    any majority it asks includes a replica that promised the newer epoch.
//! 3. **A new leader adopts before it serves.** The epoch-`e` leader asks every replica of `S`
//!    to promise `e`; each promise carries the replica's log after the leader's committed
//!    *base* entry (or, from a replica that does not hold the base, only its length and last
//!    epoch). With a majority of promises it adopts the most advanced log among them (highest
//!    `(last_epoch, last_index)`) and appends its epoch marker (rule 5). Every
//!    committed entry was fsynced by a majority in some epoch, that majority intersects this
//!    one, and logs only ever extend a leader's log, so the most advanced log contains every
//!    committed entry (as in Raft's leader completeness), the base among them; a log without
//!    the base therefore ranks lower and its entries are not needed.
//! 4. **Appends check continuity.** An append carries `(prev_index, prev_epoch)`; a replica
//!    whose log does not hold that entry refuses, and the leader backs off. Where an appended
//!    entry differs in epoch from what the replica holds, the replica truncates its suffix
//!    there: a divergent suffix was never committed.
//! 5. **Commit counts only the current epoch.** The commit point moves to an index when a
//!    majority of `S` has fsynced the log up to it in reply to appends of the current epoch
//!    (the leader counts its own log once it is durable) and the entry there is of the current
//!    epoch. A new leader appends an epoch marker (an entry without payload) after the log it
//!    adopted and serves once the marker commits; older entries commit only with it. Counting
//!    a majority for an older entry is not enough: a straggler whose log ends in a newer,
//!    uncommitted epoch could still win an adoption over it (Raft's figure 8; the simulator
//!    found it).
//! 6. **Only committed entries leave.** Acks, deliveries, reads and anti-entropy use the
//!    committed prefix ([`Replica::committed`]); a replica learns the commit point from the
//!    leader's appends, bounded by the prefix the leader has just verified on it.
//!
//! Changing `S` is an epoch change whose adoption needs majorities of both the old and the new
//! set: the caller passes both sets in [`Replica::lead`] (the old one empty when unchanged).

use std::collections::{BTreeMap, BTreeSet};

/// Most entries one append carries (a follower far behind catches up over several).
pub const MAX_APPEND: Index = 64;
/// Most payload bytes one append carries (it carries at least one entry, whatever its size).
pub const MAX_APPEND_BYTES: usize = 4 << 20;

/// The size of a payload on the wire, which bounds appends ([`MAX_APPEND_BYTES`]).
pub trait Weigh {
    /// Bytes.
    fn weight(&self) -> usize;
}

impl Weigh for bytes::Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for u64 {
    fn weight(&self) -> usize {
        8
    }
}

/// An epoch, allocated by the control plane; 0 is "none yet".
pub type Epoch = u64;
/// A position in the partition log, from 1; 0 is "before the first entry".
pub type Index = u64;
pub use super::NodeId;

/// One log entry: the epoch of the leader that first appended it, and its payload (a group
/// commit batch in the broker), or `None` for the marker a leader appends when it starts its
/// epoch (it carries no data; readers skip it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<T> {
    /// Epoch of the leader that appended it.
    pub epoch: Epoch,
    /// What was appended; `None` for an epoch marker.
    pub payload: Option<T>,
}

/// Replication messages between the replicas of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg<T> {
    /// Leader → replica: promise to follow `epoch`. `(base, base_epoch)` is an entry of the
    /// leader's durable log known to be committed (0: none): a promise carries only the log
    /// after it.
    Promise {
        /// The leader's epoch.
        epoch: Epoch,
        /// Index of the leader's committed entry the promise's log continues from.
        base: Index,
        /// Epoch of that entry (0 when `base` is 0).
        base_epoch: Epoch,
    },
    /// Replica → leader: promised, durably; here is my durable log: its length, last epoch
    /// and committed prefix, and its entries after the leader's base when it holds that entry.
    Promised {
        /// The promised epoch.
        epoch: Epoch,
        /// The base of the `Promise` this answers.
        base: Index,
        /// Length of the replica's durable log.
        len: Index,
        /// Epoch of its last entry (0 when empty).
        last_epoch: Epoch,
        /// The durable prefix of its log known committed (it matches any leader's log).
        commit: Index,
        /// Entries `base + 1 ..= len` when the replica holds the leader's base entry; `None`
        /// when it does not (its log is then never the most advanced, see `try_adopt`).
        after_base: Option<Vec<Entry<T>>>,
    },
    /// Leader → replica: entries after `prev_index`, and the leader's commit point.
    Append {
        /// The leader's epoch.
        epoch: Epoch,
        /// Index of the entry just before `entries` (0: from the start).
        prev_index: Index,
        /// Epoch of that entry (0 when `prev_index` is 0).
        prev_epoch: Epoch,
        /// Entries `prev_index + 1 ..`.
        entries: Vec<Entry<T>>,
        /// The leader's commit index.
        commit: Index,
    },
    /// Replica → leader: my log matches yours up to `index`, durably, in `epoch`.
    Appended {
        /// The epoch of the append this answers.
        epoch: Epoch,
        /// Last index known to match the leader's log, fsynced.
        index: Index,
    },
    /// Replica → leader: I do not hold `(prev_index, prev_epoch)`; my log has `len` entries.
    Mismatch {
        /// The epoch of the append this answers.
        epoch: Epoch,
        /// The `prev_index` of the refused append.
        prev_index: Index,
        /// The replica's log length (a hint for where to retry).
        len: Index,
    },
    /// Replica → sender: refused, I promised a newer epoch.
    Stale {
        /// The epoch the replica has promised.
        promised: Epoch,
    },
}

/// What the caller must do after feeding the replica something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out<T> {
    /// Send a message.
    Send {
        /// To whom.
        to: NodeId,
        /// What.
        msg: Msg<T>,
    },
    /// Entries up to this index are committed (on the leader: acknowledge them to clients;
    /// everywhere: they may be delivered and read).
    Committed(Index),
    /// This replica stopped leading the epoch it led (it learned of a newer one, or was
    /// appointed to lead a newer one itself): appends it accepted and has not reported
    /// committed may never be; fail them back to their clients, who retry.
    SteppedDown,
}

/// Why a leader refused a client append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotServing {
    /// This replica does not lead the current epoch it knows.
    NotLeader,
    /// It leads, but has not finished adopting and re-replicating the log yet.
    Adopting,
}

/// The durable part of a replica: what survives a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durable<T> {
    /// The highest epoch promised.
    pub promised: Epoch,
    /// The log as of the last completed sync.
    pub log: Vec<Entry<T>>,
    /// An index known committed (the broker's applied index; any committed index will do,
    /// 0 always does). Recovery takes it, up to the log's length, as the commit point.
    pub committed: Index,
}

impl<T> Default for Durable<T> {
    fn default() -> Self {
        Self { promised: 0, log: Vec::new(), committed: 0 }
    }
}

/// A promise as the leader keeps it.
#[derive(Debug)]
struct Promise<T> {
    len: Index,
    last_epoch: Epoch,
    commit: Index,
    /// The entries after the leader's base, when the promiser holds the base entry: all of
    /// them up to `len`, or the first chunks (a promise carries at most [`MAX_APPEND`] entries
    /// and [`MAX_APPEND_BYTES`]; the leader asks for the rest of the one it adopts).
    after_base: Option<Vec<Entry<T>>>,
}

impl<T> Promise<T> {
    /// Where the entries received so far end, when that is short of the promised log.
    fn missing_from(&self, base: Index) -> Option<Index> {
        let got = base + self.after_base.as_ref()?.len() as Index;
        (got < self.len).then_some(got)
    }
}

/// The first entries of `log` one message carries: at most [`MAX_APPEND`] and, past the
/// first, [`MAX_APPEND_BYTES`] of payload.
fn chunk<T: Weigh>(log: &[Entry<T>]) -> usize {
    let mut bytes = 0;
    let mut n = 0;
    for e in log.iter().take(MAX_APPEND as usize) {
        bytes += e.payload.as_ref().map_or(0, Weigh::weight);
        if n > 0 && bytes > MAX_APPEND_BYTES {
            break;
        }
        n += 1;
    }
    n
}

#[derive(Debug)]
enum Phase<T> {
    /// Collecting promises: who promised, with which log.
    Promising { promised: BTreeMap<NodeId, Promise<T>> },
    /// Replicating the adopted log; serving once `commit >= adopted`.
    Replicating { adopted: Index },
}

#[derive(Debug)]
struct Leading<T> {
    epoch: Epoch,
    /// The committed entry `(index, epoch)` of this replica's durable log that promises
    /// continue from (fixed for the epoch).
    base: (Index, Epoch),
    /// Replica set of this epoch.
    set: BTreeSet<NodeId>,
    /// Replica set of the previous epoch when `set` is a change of it (majorities of both).
    old_set: BTreeSet<NodeId>,
    phase: Phase<T>,
    /// Per follower: the last index sent to it (appends in flight end there; the next append
    /// continues after it), and the highest index known durable on it and matching this log
    /// (from its promise, then from its acknowledgements in `epoch`).
    sent: BTreeMap<NodeId, Index>,
    matched: BTreeMap<NodeId, Index>,
}

impl<T> Leading<T> {
    /// Every replica of this epoch (of both sets during a change) but `me`.
    fn followers(&self, me: NodeId) -> Vec<NodeId> {
        self.set.union(&self.old_set).copied().filter(|&n| n != me).collect()
    }
}

/// Where a leader's appends to each follower start.
#[derive(Debug, Clone, Copy)]
enum Resend {
    /// After a client append: only to followers whose pipeline has sent everything (the
    /// others continue when their acknowledgements come back).
    Idle,
    /// Right after adoption: after what was sent (where the follower's promised log stops
    /// matching, or optimistically after the adopted log for those that did not promise).
    Sent,
    /// On a tick: after what the follower holds, which retransmits anything lost (an empty
    /// append carries the commit point when it is up to date).
    Acked,
}

/// One replica of one partition.
#[derive(Debug)]
pub struct Replica<T> {
    id: NodeId,
    promised: Epoch,
    log: Vec<Entry<T>>,
    /// Length of the log covered by the last sync.
    synced: Index,
    commit: Index,
    /// Appends accepted but not yet durable: (leader, epoch, index) to acknowledge after sync.
    unsynced_acks: Vec<(NodeId, Epoch, Index)>,
    leading: Option<Leading<T>>,
    /// Adoptions restarted from base 0 (see `try_adopt`): always 0 unless an invariant broke.
    fallbacks: u64,
}

impl<T: Clone + PartialEq + std::fmt::Debug + Weigh> Replica<T> {
    /// A replica restarting from its durable state (a new one from `Durable::default()`).
    /// Its commit point starts at `durable.committed` (up to its log's length); a leader says
    /// the rest.
    #[must_use]
    pub fn recover(id: NodeId, durable: Durable<T>) -> Self {
        let synced = durable.log.len() as Index;
        Self {
            id,
            promised: durable.promised,
            log: durable.log,
            synced,
            commit: durable.committed.min(synced),
            unsynced_acks: Vec::new(),
            leading: None,
            fallbacks: 0,
        }
    }

    /// Adoptions this replica had to restart with whole logs because a promised log without
    /// its base ranked highest (its base was not committed: a broken invariant).
    #[must_use]
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// This replica's node id.
    #[must_use]
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The highest promised epoch.
    #[must_use]
    pub fn promised(&self) -> Epoch {
        self.promised
    }

    /// The whole log, committed or not (tests and anti-entropy bookkeeping).
    #[must_use]
    pub fn log(&self) -> &[Entry<T>] {
        &self.log
    }

    /// The committed prefix: the only entries that may be acknowledged, delivered or read.
    #[must_use]
    pub fn committed(&self) -> &[Entry<T>] {
        &self.log[..self.commit as usize]
    }

    /// The commit index.
    #[must_use]
    pub fn commit_index(&self) -> Index {
        self.commit
    }

    /// The epoch this replica leads and serves in, if it does.
    #[must_use]
    pub fn serving(&self) -> Option<Epoch> {
        let l = self.leading.as_ref()?;
        match l.phase {
            Phase::Replicating { adopted } if self.commit >= adopted => Some(l.epoch),
            _ => None,
        }
    }

    /// The epoch this replica leads, serving or still adopting.
    #[must_use]
    pub fn leading(&self) -> Option<Epoch> {
        self.leading.as_ref().map(|l| l.epoch)
    }

    /// Length of the log prefix that is durable and unchanged since the last sync: a caller
    /// that keeps its own copy of the durable log rewrites only what follows.
    #[must_use]
    pub fn durable_prefix(&self) -> Index {
        self.synced
    }

    /// Whether the log changed since the last sync (a truncation lowers the synced length
    /// and is always followed by an append, so a shorter durable prefix says it all).
    #[must_use]
    pub fn needs_sync(&self) -> bool {
        self.synced < self.log.len() as Index
    }

    /// The caller made the whole current log durable (one fsync covering every write so far).
    /// Releases the acknowledgements that waited for it, and may advance the leader's commit.
    pub fn synced(&mut self) -> Vec<Out<T>> {
        self.synced = self.log.len() as Index;
        let mut out = Vec::new();
        let promised = self.promised;
        for (leader, epoch, index) in std::mem::take(&mut self.unsynced_acks) {
            // An ack for an older epoch is useless to anyone (its leader was superseded).
            if epoch == promised && index <= self.synced {
                out.push(Out::Send { to: leader, msg: Msg::Appended { epoch, index } });
            }
        }
        if self.leading.is_some() {
            self.advance_commit(&mut out);
        }
        out
    }

    /// The control plane made this replica leader of `epoch` with replica set `set` (`old_set`:
    /// the previous set when this epoch changes it, else empty). Starts the promise round.
    pub fn lead(
        &mut self,
        epoch: Epoch,
        set: BTreeSet<NodeId>,
        old_set: BTreeSet<NodeId>,
    ) -> Vec<Out<T>> {
        let mut out = Vec::new();
        if epoch <= self.promised {
            // A stale appointment (a newer epoch is already promised here).
            return out;
        }
        // Leading an older epoch ends here: its unacknowledged appends are the caller's to
        // fail (they may be overwritten by the log this epoch adopts).
        if self.leading.take().is_some() {
            out.push(Out::SteppedDown);
        }
        // Promising itself: durable before anything else happens (the caller persists
        // [`Replica::promised`] synchronously with this call).
        self.promised = epoch;
        // Promises continue from a committed entry this replica holds durably: every
        // committed entry is in the most advanced log of any majority, so nothing up to it
        // needs to travel.
        let base = self.commit.min(self.synced);
        let base_epoch = base.checked_sub(1).map_or(0, |i| self.log[i as usize].epoch);
        let mut promised = BTreeMap::new();
        promised.insert(self.id, self.own_promise(base));
        let l = Leading {
            epoch,
            base: (base, base_epoch),
            set,
            old_set,
            phase: Phase::Promising { promised },
            sent: BTreeMap::new(),
            matched: BTreeMap::new(),
        };
        for to in l.followers(self.id) {
            out.push(Out::Send { to, msg: Msg::Promise { epoch, base, base_epoch } });
        }
        self.leading = Some(l);
        self.try_adopt(&mut out);
        out
    }

    /// A client entry, on the leader: appended if serving, committed later (watch for
    /// [`Out::Committed`]). Returns the entry's index.
    ///
    /// # Errors
    /// When this replica does not serve (not the leader, or still adopting).
    pub fn append(&mut self, payload: T) -> Result<(Index, Vec<Out<T>>), NotServing> {
        let Some(epoch) = self.serving() else {
            return Err(if self.leading.is_some() {
                NotServing::Adopting
            } else {
                NotServing::NotLeader
            });
        };
        self.log.push(Entry { epoch, payload: Some(payload) });
        let index = self.log.len() as Index;
        let mut out = Vec::new();
        self.replicate(&mut out, Resend::Idle);
        Ok((index, out))
    }

    /// Periodic work: a leader re-sends what may have been lost (promises to those that did not
    /// answer, appends to those behind).
    pub fn tick(&mut self) -> Vec<Out<T>> {
        let mut out = Vec::new();
        let Some(l) = &self.leading else { return out };
        match &l.phase {
            Phase::Promising { promised } => {
                let (base, base_epoch) = l.base;
                for to in l.followers(self.id) {
                    if !promised.contains_key(&to) {
                        out.push(Out::Send {
                            to,
                            msg: Msg::Promise { epoch: l.epoch, base, base_epoch },
                        });
                    }
                }
                // A chunk of the log being fetched may have been lost: ask again.
                self.try_adopt(&mut out);
            }
            Phase::Replicating { .. } => self.replicate(&mut out, Resend::Acked),
        }
        out
    }

    /// On a leader: how many entries of its log the furthest-behind follower of its set has
    /// not acknowledged (replication lag); `None` when it does not lead.
    #[must_use]
    pub fn lag(&self) -> Option<Index> {
        let l = self.leading.as_ref()?;
        let len = self.log.len() as Index;
        let behind = l
            .followers(self.id)
            .into_iter()
            .map(|n| len.saturating_sub(l.matched.get(&n).copied().unwrap_or(0)));
        Some(behind.max().unwrap_or(0))
    }

    /// On a serving leader: an empty append to every follower from the prefix it has
    /// acknowledged, carrying the commit point, so followers learn it now (to apply and deliver
    /// committed entries) instead of with the next append or tick.
    pub fn announce_commit(&mut self) -> Vec<Out<T>> {
        let mut out = Vec::new();
        let Some(l) = &self.leading else { return out };
        if !matches!(l.phase, Phase::Replicating { .. }) {
            return out;
        }
        for to in l.followers(self.id) {
            let prev_index = l.matched.get(&to).copied().unwrap_or(0);
            let Some(prev) = prev_index.checked_sub(1).and_then(|i| self.log.get(i as usize))
            else {
                continue;
            };
            out.push(Out::Send {
                to,
                msg: Msg::Append {
                    epoch: l.epoch,
                    prev_index,
                    prev_epoch: prev.epoch,
                    entries: Vec::new(),
                    commit: self.commit,
                },
            });
        }
        out
    }

    /// The set change of `epoch` is complete (the control plane recorded that this replica,
    /// its leader, served in it): from now on commits need a majority of the new set only, and
    /// the old set's members get no more appends. Ignored unless it serves `epoch`: only then
    /// does a majority of the new set hold everything committed (the adopted log was committed
    /// with majorities of both sets).
    pub fn settle(&mut self, epoch: Epoch) -> Vec<Out<T>> {
        let mut out = Vec::new();
        if self.serving() != Some(epoch) {
            return out;
        }
        if let Some(l) = self.leading.as_mut()
            && !l.old_set.is_empty()
        {
            l.old_set.clear();
            // Entries held by a majority of the new set commit now.
            self.advance_commit(&mut out);
        }
        out
    }

    /// This replica's own durable log as a promise from `base`.
    fn own_promise(&self, base: Index) -> Promise<T> {
        let durable = &self.log[..self.synced as usize];
        Promise {
            len: self.synced,
            last_epoch: durable.last().map_or(0, |e| e.epoch),
            commit: self.commit.min(self.synced),
            after_base: durable.get(base as usize..).map(<[Entry<T>]>::to_vec),
        }
    }

    /// Replaces the payloads of entries `from ..= upto` (from 1; at most the committed and
    /// durable prefix) with `f` of each: the caller moves applied payloads out of memory and
    /// reads them back from its storage when an append or a promise carries them.
    pub fn map_payloads(&mut self, from: Index, upto: Index, mut f: impl FnMut(&T) -> T) {
        let upto = upto.min(self.commit).min(self.synced);
        for e in self.log.iter_mut().take(upto as usize).skip(from.saturating_sub(1) as usize) {
            if let Some(p) = &e.payload {
                e.payload = Some(f(p));
            }
        }
    }

    /// A message from `from`.
    pub fn handle(&mut self, from: NodeId, msg: Msg<T>) -> Vec<Out<T>> {
        let mut out = Vec::new();
        match msg {
            Msg::Promise { epoch, base, base_epoch } => {
                if epoch < self.promised || (epoch == self.promised && self.leads(epoch)) {
                    out.push(Out::Send { to: from, msg: Msg::Stale { promised: self.promised } });
                } else {
                    self.observe_epoch(epoch, &mut out);
                    // The promise is durable before the reply (the caller persists it with the
                    // reply). Only the synced log is offered: an unsynced suffix may vanish.
                    // Of it, only what follows the leader's committed base entry travels.
                    let durable = &self.log[..self.synced as usize];
                    let holds = base == 0
                        || durable.get(base as usize - 1).is_some_and(|e| e.epoch == base_epoch);
                    let mut p = self.own_promise(base);
                    if holds {
                        if let Some(log) = p.after_base.as_mut() {
                            log.truncate(chunk(log));
                        }
                    } else {
                        p.after_base = None;
                    }
                    let Promise { len, last_epoch, commit, after_base } = p;
                    let msg = Msg::Promised { epoch, base, len, last_epoch, commit, after_base };
                    out.push(Out::Send { to: from, msg });
                }
            }
            Msg::Promised { epoch, base, len, last_epoch, commit, after_base } => {
                let promise = Promise { len, last_epoch, commit, after_base };
                self.on_promised(from, epoch, base, promise, &mut out);
            }
            Msg::Append { epoch, prev_index, prev_epoch, entries, commit } => {
                self.on_append(from, epoch, prev_index, prev_epoch, entries, commit, &mut out);
            }
            Msg::Appended { epoch, index } => self.on_appended(from, epoch, index, &mut out),
            Msg::Mismatch { epoch, prev_index, len } => {
                if let Some(l) = self.leading.as_mut()
                    && l.epoch == epoch
                    && prev_index >= l.matched.get(&from).copied().unwrap_or(0)
                    && prev_index <= l.sent.get(&from).copied().unwrap_or(0)
                {
                    // Retry from one entry earlier, or from the follower's end if that is
                    // earlier still. Each refused append causes one retry: no storm.
                    let from_index = prev_index.min(len.saturating_add(1)).max(1);
                    self.send_from(from, from_index, &mut out);
                }
            }
            Msg::Stale { promised } => self.observe_epoch(promised, &mut out),
        }
        out
    }

    fn leads(&self, epoch: Epoch) -> bool {
        self.leading.as_ref().is_some_and(|l| l.epoch == epoch)
    }

    /// Learns of `epoch`: a newer one fences this replica (it stops leading).
    fn observe_epoch(&mut self, epoch: Epoch, out: &mut Vec<Out<T>>) {
        if epoch > self.promised {
            self.promised = epoch;
            // Acks promised to an older leader are void.
            self.unsynced_acks.retain(|a| a.1 == epoch);
        }
        if self.leading.as_ref().is_some_and(|l| l.epoch < self.promised) {
            self.leading = None;
            out.push(Out::SteppedDown);
        }
    }

    fn on_promised(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        base: Index,
        promise: Promise<T>,
        out: &mut Vec<Out<T>>,
    ) {
        let Some(l) = self.leading.as_mut() else { return };
        if l.epoch != epoch {
            return;
        }
        let start = l.base.0;
        let Phase::Promising { promised } = &mut l.phase else { return };
        if base == start {
            promised.insert(from, promise);
        } else if let Some(held) = promised.get_mut(&from)
            && held.missing_from(start) == Some(base)
        {
            // The next chunk of a log being fetched.
            match (held.after_base.as_mut(), promise.after_base) {
                (Some(log), Some(more)) if !more.is_empty() => log.extend(more),
                // It no longer holds where its log stopped (cannot happen while it keeps its
                // promise): start its promise over.
                _ => {
                    promised.remove(&from);
                }
            }
        } else {
            // An answer to an older round (before a fallback to base 0), or a duplicate.
            return;
        }
        self.try_adopt(out);
    }

    /// With promises from a majority (of both sets on a set change), adopts the most advanced
    /// log among them and starts re-replicating it.
    fn try_adopt(&mut self, out: &mut Vec<Out<T>>) {
        let Some(l) = self.leading.as_mut() else { return };
        let Phase::Promising { promised } = &mut l.phase else { return };
        let voters: BTreeSet<NodeId> = promised.keys().copied().collect();
        if !majority(&l.set, &voters) || !(l.old_set.is_empty() || majority(&l.old_set, &voters)) {
            return;
        }
        // The most advanced log holds every committed entry, the base among them, so it is
        // one that holds the base: two logs ending in the same (index, epoch) are equal, so a
        // log without the base ranks strictly lower.
        let rank = |p: &Promise<T>| (p.last_epoch, p.len);
        let best_rank = promised.values().filter(|p| p.after_base.is_some()).map(rank).max();
        if promised.values().any(|p| p.after_base.is_none() && Some(rank(p)) > best_rank) {
            // Then the base was not committed after all (a broken invariant: the simulator
            // fails on it). Adopting now could lose committed entries: ask again for whole
            // logs.
            self.fallbacks += 1;
            tracing::error!(
                epoch = l.epoch,
                base = l.base.0,
                "a promised log without the leader's base entry ranks highest; promising again from the start"
            );
            l.base = (0, 0);
            promised.clear();
            let epoch = l.epoch;
            for to in l.followers(self.id) {
                out.push(Out::Send { to, msg: Msg::Promise { epoch, base: 0, base_epoch: 0 } });
            }
            let own = self.own_promise(0);
            if let Some(Leading { phase: Phase::Promising { promised }, .. }) =
                self.leading.as_mut()
            {
                promised.insert(self.id, own);
            }
            return;
        }
        // The log to adopt must be complete here: ask for its next chunk first.
        let best_node = promised
            .iter()
            .filter(|(_, p)| p.after_base.is_some())
            .max_by_key(|(_, p)| rank(p))
            .map(|(n, _)| *n);
        if let Some(node) = best_node
            && let Some(from) = promised[&node].missing_from(l.base.0)
        {
            let base_epoch = promised[&node]
                .after_base
                .as_ref()
                .and_then(|log| log.last())
                .map_or(l.base.1, |e| e.epoch);
            let msg = Msg::Promise { epoch: l.epoch, base: from, base_epoch };
            out.push(Out::Send { to: node, msg });
            return;
        }
        let promised = std::mem::take(promised);
        let base = l.base.0 as usize;
        let best = best_node.and_then(|n| promised[&n].after_base.as_deref()).unwrap_or_default();
        // The leader's own log becomes the adopted one (its own divergent suffix, never
        // committed, is dropped). It is rewritten durably before it counts for itself.
        let own_prefix = base + common_prefix(&self.log[base..], best);
        if own_prefix < self.log.len() || base + best.len() > self.log.len() {
            self.log.truncate(base);
            self.log.extend_from_slice(best);
            self.synced = self.synced.min(own_prefix as Index);
        }
        // The epoch marker: the first entry of this epoch. Committing it (a majority holds it)
        // commits the adopted log under this epoch, and makes every log that holds it compare
        // as more advanced than any log of an older epoch (a straggler holding an uncommitted
        // entry of a newer epoch than the adopted entries can no longer win an adoption).
        self.log.push(Entry { epoch: l.epoch, payload: None });
        let adopted = self.log.len() as Index;
        // Where each promiser's log first differs is known from its promise.
        for (node, p) in &promised {
            if *node != self.id {
                // The promised log was durable; its prefix matching the adopted log stays
                // (nothing truncates it in this epoch but this leader's own appends). Commit
                // counting cannot misuse it: it ends before this epoch's marker. A promiser
                // without the base matches at least its committed prefix (every committed entry
                // is in the adopted log, at its index); appends start after it.
                let (sent, matched) = match &p.after_base {
                    Some(log) => {
                        let lcp = (base + common_prefix(log, &self.log[base..])) as Index;
                        (lcp, lcp)
                    }
                    None => {
                        let known = p.commit.min(base as Index);
                        (known, known)
                    }
                };
                l.sent.insert(*node, sent);
                l.matched.insert(*node, matched);
            }
        }
        for node in l.followers(self.id) {
            l.sent.entry(node).or_insert(adopted.saturating_sub(1));
        }
        l.phase = Phase::Replicating { adopted };
        self.replicate(out, Resend::Sent);
        self.advance_commit(out);
    }

    /// Sends appends to the followers, each from where `mode` says.
    fn replicate(&mut self, out: &mut Vec<Out<T>>, mode: Resend) {
        let Some(l) = &self.leading else { return };
        let len = self.log.len() as Index;
        let get = |m: &BTreeMap<NodeId, Index>, n: NodeId| m.get(&n).copied().unwrap_or(0);
        let targets: Vec<(NodeId, Index)> = l
            .followers(self.id)
            .into_iter()
            .filter_map(|n| {
                let from = match mode {
                    Resend::Idle => (get(&l.sent, n) + 1 == len).then_some(get(&l.sent, n) + 1)?,
                    Resend::Sent => get(&l.sent, n) + 1,
                    Resend::Acked => get(&l.matched, n) + 1,
                };
                Some((n, from))
            })
            .collect();
        for (to, from_index) in targets {
            self.send_from(to, from_index, out);
        }
    }

    /// Sends one append to `to` starting at `from_index` (at most [`MAX_APPEND`] entries and
    /// [`MAX_APPEND_BYTES`] of payload, at least one entry).
    fn send_from(&mut self, to: NodeId, from_index: Index, out: &mut Vec<Out<T>>) {
        let Some(l) = self.leading.as_mut() else { return };
        let len = self.log.len() as Index;
        let prev_index = from_index.clamp(1, len + 1) - 1;
        let prev_epoch = if prev_index == 0 { 0 } else { self.log[prev_index as usize - 1].epoch };
        let upto = prev_index + chunk(&self.log[prev_index as usize..]) as Index;
        let entries = self.log[prev_index as usize..upto as usize].to_vec();
        l.sent.insert(to, upto);
        out.push(Out::Send {
            to,
            msg: Msg::Append {
                epoch: l.epoch,
                prev_index,
                prev_epoch,
                entries,
                commit: self.commit,
            },
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        prev_index: Index,
        prev_epoch: Epoch,
        entries: Vec<Entry<T>>,
        commit: Index,
        out: &mut Vec<Out<T>>,
    ) {
        if epoch < self.promised {
            out.push(Out::Send { to: from, msg: Msg::Stale { promised: self.promised } });
            return;
        }
        // Appends of the epoch this replica leads come from nobody else (one leader per epoch):
        // a peer's bug, or forged. Taking them could cut the log under its own adoption.
        if self.leads(epoch) {
            return;
        }
        self.observe_epoch(epoch, out);
        let holds_prev = prev_index == 0
            || self.log.get(prev_index as usize - 1).is_some_and(|e| e.epoch == prev_epoch);
        if !holds_prev {
            out.push(Out::Send {
                to: from,
                msg: Msg::Mismatch { epoch, prev_index, len: self.log.len() as Index },
            });
            return;
        }
        let carried = entries.len() as Index;
        for (offset, entry) in entries.into_iter().enumerate() {
            let at = prev_index as usize + offset;
            match self.log.get(at) {
                Some(held) if held.epoch == entry.epoch => {
                    // Same (index, epoch): the same entry (one leader per epoch).
                    debug_assert_eq!(held, &entry);
                }
                Some(_) => {
                    // A divergent suffix: never committed (the leader's log holds every
                    // committed entry), so it goes.
                    debug_assert!(at as Index >= self.commit, "truncating committed entries");
                    self.log.truncate(at);
                    self.synced = self.synced.min(at as Index);
                    self.log.push(entry);
                }
                None => {
                    self.log.push(entry);
                }
            }
        }
        // The prefix now known to match the leader's log: what this append carried (the local
        // log may be longer, with entries a later append brought first, or an old divergent
        // tail not yet overwritten).
        let verified = prev_index + carried;
        let new_commit = commit.min(verified);
        if new_commit > self.commit {
            self.commit = new_commit;
            out.push(Out::Committed(self.commit));
        }
        if verified <= self.synced {
            out.push(Out::Send { to: from, msg: Msg::Appended { epoch, index: verified } });
        } else {
            self.unsynced_acks.push((from, epoch, verified));
        }
    }

    fn on_appended(&mut self, from: NodeId, epoch: Epoch, index: Index, out: &mut Vec<Out<T>>) {
        let Some(l) = self.leading.as_mut() else { return };
        // Beyond this log: not an answer to anything it sent (a peer's bug, or forged).
        if l.epoch != epoch
            || !matches!(l.phase, Phase::Replicating { .. })
            || index > self.log.len() as Index
        {
            return;
        }
        let m = l.matched.entry(from).or_insert(0);
        *m = (*m).max(index);
        let matched = *m;
        let sent = l.sent.entry(from).or_insert(matched);
        *sent = (*sent).max(matched);
        // The pipeline to this follower has drained and it is still behind: next chunk.
        if matched == *sent && matched < self.log.len() as Index {
            self.send_from(from, matched + 1, out);
        }
        self.advance_commit(out);
    }

    /// The leader's commit: the highest index a majority of the set (of both sets on a change)
    /// holds durably in this epoch, counting the leader's own synced log.
    fn advance_commit(&mut self, out: &mut Vec<Out<T>>) {
        let Some(l) = &self.leading else { return };
        if !matches!(l.phase, Phase::Replicating { .. }) {
            return;
        }
        let matched = |n: &NodeId| {
            if *n == self.id { self.synced } else { l.matched.get(n).copied().unwrap_or(0) }
        };
        let mut candidate = quorum_index(&l.set, matched);
        if !l.old_set.is_empty() {
            candidate = candidate.min(quorum_index(&l.old_set, matched));
        }
        // Only an entry of this epoch commits by counting (everything before it with it): an
        // older entry held by a majority can still lose an adoption to a log that ends in a
        // newer epoch (Raft's figure 8). The epoch marker makes this possible at once.
        let current = candidate > 0 && self.log[candidate as usize - 1].epoch == l.epoch;
        if candidate > self.commit && current {
            self.commit = candidate;
            out.push(Out::Committed(candidate));
            // Followers learn the new commit point with the next append or heartbeat.
        }
    }
}

/// Whether `voters` holds a majority of `set`.
fn majority(set: &BTreeSet<NodeId>, voters: &BTreeSet<NodeId>) -> bool {
    set.intersection(voters).count() * 2 > set.len()
}

/// The highest index held by a majority of `set`.
fn quorum_index(set: &BTreeSet<NodeId>, matched: impl Fn(&NodeId) -> Index) -> Index {
    let mut held: Vec<Index> = set.iter().map(matched).collect();
    held.sort_unstable_by(|a, b| b.cmp(a));
    // With n members, a majority is n/2 + 1: the (n/2)-th highest value (0-based).
    held.get(set.len() / 2).copied().unwrap_or(0)
}

/// Length of the common prefix of two logs (by epoch and payload).
fn common_prefix<T: PartialEq>(a: &[Entry<T>], b: &[Entry<T>]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
