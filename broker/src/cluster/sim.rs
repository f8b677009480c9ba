//! Deterministic simulation of partition replication ([`super::replica`]).
//!
//! One seed fixes everything: message loss, delay (hence reordering), duplication,
//! partitions, crashes (a crashed replica keeps only what it synced), restarts, and epoch
//! changes by a control plane that picks any node (alive or not) as the next leader. Clients
//! send to a random node or to the leader. A checker runs after every event:
//! - every replica's committed prefix agrees with every other's (same entry at every index);
//! - an acknowledged entry stays at its index in every committed prefix that reaches it;
//! - at the end (faults stopped, crashed nodes restarted, a live leader appointed) every
//!   replica commits the same log, holding every acknowledged entry;
//! - a run that acknowledges nothing fails (a checker of nothing proves nothing).
//!
//! `SIM_SEEDS=n` runs more seeds; `SIM_SEED=s` replays one (the failure message prints it);
//! with `SIM_TRACE=1` a replay prints every delivery and every commit.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use super::replica::{Durable, Entry, Epoch, Index, MAX_APPEND, Msg, NodeId, Out, Replica};

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        #[allow(clippy::cast_precision_loss)]
        let x = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }
}

#[derive(Debug)]
enum Event {
    Deliver { from: NodeId, to: NodeId, incarnation: u64, msg: Msg<u64> },
    Tick { node: NodeId, incarnation: u64 },
    Sync { node: NodeId, incarnation: u64 },
    Client,
    Crash,
    Restart { node: NodeId },
    NewEpoch,
    Partition,
    Heal,
}

struct Node {
    replica: Replica<u64>,
    disk: Durable<u64>,
    up: bool,
    incarnation: u64,
    sync_scheduled: bool,
    /// Entries this node appended as leader, by index, not yet acknowledged.
    pending: BTreeMap<Index, u64>,
    /// Committed indices already compared with the truth.
    checked: Index,
}

/// Fault settings drawn from the seed.
struct Faults {
    drop: f64,
    duplicate: f64,
    max_delay: u64,
    crashes: bool,
    partitions: bool,
}

struct Sim {
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: BTreeMap<NodeId, Node>,
    set: BTreeSet<NodeId>,
    /// Every node (the set is a subset).
    all: BTreeSet<NodeId>,
    /// The previous set while a change of it has not completed (a leader of the new set has
    /// not served yet): every epoch until then needs majorities of both.
    old_set: BTreeSet<NodeId>,
    set_changes: u64,
    epoch: Epoch,
    faults: Faults,
    /// Links cut by a partition: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    next_payload: u64,
    /// The first entry ever seen committed at each index: (epoch, payload; `None`: a marker).
    truth: BTreeMap<Index, (Epoch, Option<u64>)>,
    /// Acknowledged payload → index, and index → payload.
    acked: BTreeMap<u64, Index>,
    acked_at: BTreeMap<Index, u64>,
    last_progress: u64,
    healing: bool,
    log: Vec<String>,
    /// `SIM_TRACE` is set: print every delivery and commit.
    verbose: bool,
}

const TICK_MS: u64 = 10;
const RUN_MS: u64 = 3_000;
const HEAL_MS: u64 = 6_000;

impl Sim {
    /// `nodes` in the cluster, the first `replicas` of them the initial replica set; with
    /// more nodes than replicas the control plane also moves the set (one member at a time).
    fn new(seed: u64, nodes: u64, replicas: u64) -> Self {
        let mut rng = Rng(seed);
        let faults = Faults {
            drop: [0.0, 0.05, 0.2][rng.below(3) as usize],
            duplicate: [0.0, 0.05][rng.below(2) as usize],
            max_delay: [2, 10, 40][rng.below(3) as usize],
            crashes: rng.chance(0.7),
            partitions: rng.chance(0.6),
        };
        let set: BTreeSet<NodeId> = (1..=replicas).collect();
        let all: BTreeSet<NodeId> = (1..=nodes).collect();
        let nodes = all
            .iter()
            .map(|&id| {
                let node = Node {
                    replica: Replica::recover(id, Durable::default()),
                    disk: Durable::default(),
                    up: true,
                    incarnation: 0,
                    sync_scheduled: false,
                    pending: BTreeMap::new(),
                    checked: 0,
                };
                (id, node)
            })
            .collect();
        let mut sim = Self {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: Vec::new(),
            nodes,
            set,
            all,
            old_set: BTreeSet::new(),
            set_changes: 0,
            epoch: 0,
            faults,
            cut: BTreeSet::new(),
            next_payload: 1,
            truth: BTreeMap::new(),
            acked: BTreeMap::new(),
            acked_at: BTreeMap::new(),
            last_progress: 0,
            healing: false,
            log: Vec::new(),
            verbose: std::env::var_os("SIM_TRACE").is_some(),
        };
        for id in sim.all.clone() {
            sim.at(TICK_MS, Event::Tick { node: id, incarnation: 0 });
        }
        sim.at(1, Event::NewEpoch);
        sim.at(5, Event::Client);
        if sim.faults.crashes {
            let t = 100 + sim.rng.below(400);
            sim.at(t, Event::Crash);
        }
        if sim.faults.partitions {
            let t = 100 + sim.rng.below(600);
            sim.at(t, Event::Partition);
        }
        sim
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.events.push(Some(event));
        self.queue.push(Reverse((self.now + delay, self.seq, self.events.len() - 1)));
    }

    fn trace(&mut self, what: String) {
        if self.log.len() < 400 {
            self.log.push(format!("{:>6} {what}", self.now));
        }
    }

    /// Runs to the end; `Err` explains the first violation.
    fn run(&mut self) -> Result<(), String> {
        while let Some(Reverse((time, _, idx))) = self.queue.pop() {
            if time > RUN_MS + HEAL_MS {
                break;
            }
            self.now = time;
            if !self.healing && self.now >= RUN_MS {
                self.start_healing();
            }
            let event = self.events[idx].take().expect("each event runs once");
            self.step(event)?;
            self.check()?;
            if self.healing && self.converged() {
                return self.final_check();
            }
        }
        Err(format!(
            "no convergence {HEAL_MS} ms after faults stopped: commits {:?}",
            self.nodes.values().map(|n| n.replica.commit_index()).collect::<Vec<_>>()
        ))
    }

    fn start_healing(&mut self) {
        self.healing = true;
        self.cut.clear();
        self.faults.drop = 0.0;
        self.faults.duplicate = 0.0;
        for id in self.all.clone() {
            if !self.nodes[&id].up {
                self.at(1, Event::Restart { node: id });
            }
        }
        self.at(5, Event::NewEpoch);
        self.trace("faults stop".into());
    }

    fn step(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Deliver { from, to, incarnation, msg } => {
                let n = &self.nodes[&to];
                if !n.up || n.incarnation != incarnation {
                    return Ok(());
                }
                if self.verbose {
                    let what = match &msg {
                        Msg::Promised { epoch, base, len, last_epoch, commit, after_base } => {
                            format!(
                                "Promised e{epoch} base {base} len {len} last epoch {last_epoch} \
                                 commit {commit} after base {:?}",
                                after_base.as_ref().map(Vec::len)
                            )
                        }
                        Msg::Append { epoch, prev_index, prev_epoch, entries, commit } => format!(
                            "Append e{epoch} prev ({prev_index},{prev_epoch}) n {} commit {commit}",
                            entries.len()
                        ),
                        other => format!("{other:?}"),
                    };
                    eprintln!(
                        "{:>6} {from}->{to} {what} | {to}: len {} synced {} commit {} promised {}",
                        self.now,
                        n.replica.log().len(),
                        n.replica.durable_prefix(),
                        n.replica.commit_index(),
                        n.replica.promised()
                    );
                }
                let outs = self.nodes.get_mut(&to).expect("node").replica.handle(from, msg);
                self.apply(to, outs)?;
            }
            Event::Tick { node, incarnation } => {
                let n = &self.nodes[&node];
                if n.up && n.incarnation == incarnation {
                    let outs = self.nodes.get_mut(&node).expect("node").replica.tick();
                    self.apply(node, outs)?;
                    self.at(TICK_MS, Event::Tick { node, incarnation });
                }
            }
            Event::Sync { node, incarnation } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.up && n.incarnation == incarnation {
                    n.sync_scheduled = false;
                    // What one fsync makes durable: the unchanged prefix stays, the rest of the
                    // log is rewritten.
                    let keep = n.replica.durable_prefix() as usize;
                    n.disk.log.truncate(keep);
                    n.disk.log.extend_from_slice(&n.replica.log()[keep..]);
                    // The broker's applied index (committed, written lazily): usually the
                    // commit point, sometimes left behind.
                    if self.rng.below(4) != 0 {
                        n.disk.committed = n.replica.commit_index();
                    }
                    let outs = n.replica.synced();
                    self.apply(node, outs)?;
                }
            }
            Event::Client => {
                self.client_send()?;
                let d = 1 + self.rng.below(6);
                if !self.healing || self.acked.len() < 5 {
                    self.at(d, Event::Client);
                }
            }
            Event::Crash => {
                if !self.healing {
                    let id = 1 + self.rng.below(self.all.len() as u64);
                    if self.nodes[&id].up {
                        let n = self.nodes.get_mut(&id).expect("node");
                        n.up = false;
                        n.pending.clear();
                        self.trace(format!("crash {id}"));
                        let back = 20 + self.rng.below(300);
                        self.at(back, Event::Restart { node: id });
                    }
                    let next = 100 + self.rng.below(500);
                    self.at(next, Event::Crash);
                }
            }
            Event::Restart { node } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if !n.up {
                    n.up = true;
                    n.incarnation += 1;
                    n.sync_scheduled = false;
                    n.replica = Replica::recover(node, n.disk.clone());
                    let inc = n.incarnation;
                    let entries = n.disk.log.len();
                    self.trace(format!("restart {node} with {entries} entries"));
                    self.at(TICK_MS, Event::Tick { node, incarnation: inc });
                }
            }
            Event::NewEpoch => self.new_epoch()?,
            Event::Partition => {
                if !self.healing {
                    let ids: Vec<NodeId> = self.all.iter().copied().collect();
                    let minority: BTreeSet<NodeId> =
                        ids.iter().copied().filter(|_| self.rng.chance(0.4)).collect();
                    for &a in &ids {
                        for &b in &ids {
                            if minority.contains(&a) != minority.contains(&b) {
                                self.cut.insert((a, b));
                            }
                        }
                    }
                    self.trace(format!("partition {minority:?}"));
                    let t = 50 + self.rng.below(400);
                    self.at(t, Event::Heal);
                }
            }
            Event::Heal => {
                self.cut.clear();
                self.trace("heal".into());
                if !self.healing {
                    let t = 100 + self.rng.below(600);
                    self.at(t, Event::Partition);
                }
            }
        }
        // A set change completes once a leader of an epoch carrying it serves (it then holds a
        // majority of both sets): later epochs need the new set only.
        if !self.old_set.is_empty()
            && let Some(&leader) = self
                .nodes
                .iter()
                .find(|(_, n)| n.up && n.replica.serving() == Some(self.epoch))
                .map(|(id, _)| id)
        {
            self.trace(format!("set change to {:?} complete", self.set));
            self.old_set.clear();
            // As the broker's control plane records the move settled, and its leader then
            // stops counting the old set (or, when the record comes too late, the next epoch
            // does).
            if self.rng.chance(0.7) {
                let epoch = self.epoch;
                let outs = self.nodes.get_mut(&leader).expect("node").replica.settle(epoch);
                self.trace(format!("settle {leader} e{epoch}"));
                self.apply(leader, outs)?;
            }
        }
        // The control plane appoints a new leader when nothing commits for a while.
        if self.now.saturating_sub(self.last_progress) > 300 {
            self.last_progress = self.now;
            self.at(1, Event::NewEpoch);
        }
        Ok(())
    }

    fn new_epoch(&mut self) -> Result<(), String> {
        self.epoch += 1;
        // Sometimes the control plane moves the set: one member out, one non-member in. The
        // previous set stays attached until a leader of the new one has served.
        let outsiders: Vec<NodeId> = self.all.difference(&self.set).copied().collect();
        if !self.healing && self.old_set.is_empty() && !outsiders.is_empty() && self.rng.chance(0.3)
        {
            let members: Vec<NodeId> = self.set.iter().copied().collect();
            let out = members[self.rng.below(members.len() as u64) as usize];
            let inn = outsiders[self.rng.below(outsiders.len() as u64) as usize];
            self.old_set = self.set.clone();
            self.set.remove(&out);
            self.set.insert(inn);
            self.set_changes += 1;
            self.trace(format!("set {:?} -> {:?}", self.old_set, self.set));
        }
        let candidates: Vec<NodeId> = if self.healing {
            self.set.iter().copied().filter(|id| self.nodes[id].up).collect()
        } else {
            self.set.iter().copied().collect()
        };
        if candidates.is_empty() {
            return Ok(());
        }
        let leader = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.trace(format!("epoch {} leader {leader}", self.epoch));
        if !self.nodes[&leader].up {
            return Ok(());
        }
        let epoch = self.epoch;
        let (set, old) = (self.set.clone(), self.old_set.clone());
        let n = self.nodes.get_mut(&leader).expect("node");
        let outs = n.replica.lead(epoch, set, old);
        self.apply(leader, outs)
    }

    fn client_send(&mut self) -> Result<(), String> {
        let serving: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.up && n.replica.serving().is_some())
            .map(|(id, _)| *id)
            .collect();
        let target = if !serving.is_empty() && self.rng.chance(0.8) {
            serving[self.rng.below(serving.len() as u64) as usize]
        } else {
            1 + self.rng.below(self.all.len() as u64)
        };
        if !self.nodes[&target].up {
            return Ok(());
        }
        let payload = self.next_payload;
        let n = self.nodes.get_mut(&target).expect("node");
        if let Ok((index, outs)) = n.replica.append(payload) {
            self.next_payload += 1;
            n.pending.insert(index, payload);
            self.apply(target, outs)?;
        }
        Ok(())
    }

    /// Carries out a replica's outputs: messages through the faulty network, syncs, acks.
    fn apply(&mut self, node: NodeId, outs: Vec<Out<u64>>) -> Result<(), String> {
        // Promises are durable at once (the broker writes them synchronously).
        {
            let n = self.nodes.get_mut(&node).expect("node");
            n.disk.promised = n.replica.promised();
            if n.replica.fallbacks() > 0 {
                return Err(format!("node {node}: a leader's base was not committed"));
            }
        }
        for out in outs {
            match out {
                Out::Send { to, msg } => self.send(node, to, msg),
                Out::Committed(upto) => {
                    if self.verbose {
                        let r = &self.nodes[&node].replica;
                        eprintln!(
                            "{:>6} node {node} commits to {upto} (entry {:?}, leading {:?})",
                            self.now,
                            r.log().get(upto as usize - 1).map(|e| (e.epoch, e.payload)),
                            r.leading()
                        );
                    }
                    self.on_committed(node, upto)?;
                    // As the engine does: followers hear of a leader's new commit point now.
                    let n = self.nodes.get_mut(&node).expect("node");
                    if n.replica.leading().is_some() {
                        for out in n.replica.announce_commit() {
                            if let Out::Send { to, msg } = out {
                                self.send(node, to, msg);
                            }
                        }
                    }
                }
                Out::SteppedDown => {
                    self.nodes.get_mut(&node).expect("node").pending.clear();
                }
            }
        }
        let n = self.nodes.get_mut(&node).expect("node");
        if n.replica.needs_sync() && !n.sync_scheduled {
            n.sync_scheduled = true;
            let inc = n.incarnation;
            let d = 1 + self.rng.below(5);
            self.at(d, Event::Sync { node, incarnation: inc });
        }
        Ok(())
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg<u64>) {
        if self.cut.contains(&(from, to)) || self.rng.chance(self.faults.drop) {
            return;
        }
        let copies = if self.rng.chance(self.faults.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(self.faults.max_delay);
            let incarnation = self.nodes[&to].incarnation;
            self.at(delay, Event::Deliver { from, to, incarnation, msg: msg.clone() });
        }
    }

    fn on_committed(&mut self, node: NodeId, upto: Index) -> Result<(), String> {
        self.last_progress = self.now;
        let n = self.nodes.get_mut(&node).expect("node");
        let acked: Vec<(Index, u64)> = n.pending.range(..=upto).map(|(i, p)| (*i, *p)).collect();
        for (i, _) in &acked {
            n.pending.remove(i);
        }
        for (index, payload) in acked {
            let held = n.replica.committed().get(index as usize - 1).and_then(|e| e.payload);
            if held != Some(payload) {
                return Err(format!(
                    "leader {node} acks {payload} at {index} but holds {held:?} committed there"
                ));
            }
            if let Some(prev) = self.acked.insert(payload, index) {
                return Err(format!("{payload} acknowledged twice (at {prev} and {index})"));
            }
            if let Some(other) = self.acked_at.insert(index, payload) {
                return Err(format!("{other} and {payload} both acknowledged at {index}"));
            }
            if let Some(&(_, held)) = self.truth.get(&index)
                && held != Some(payload)
            {
                return Err(format!(
                    "acknowledged {payload} at {index}, but {held:?} was committed there"
                ));
            }
        }
        Ok(())
    }

    /// Safety, after every event. Incremental: each node's newly committed indices are
    /// compared with the first entry ever committed there (commit indices only grow within an
    /// incarnation; a restarted node is checked again from the start).
    fn check(&mut self) -> Result<(), String> {
        for (id, n) in self.nodes.iter_mut() {
            let committed = n.replica.committed();
            if (committed.len() as Index) < n.checked {
                n.checked = 0;
            }
            for (i, e) in committed.iter().enumerate().skip(n.checked as usize) {
                let index = i as Index + 1;
                match self.truth.get(&index) {
                    Some(&(epoch, payload)) if (epoch, payload) != (e.epoch, e.payload) => {
                        return Err(format!(
                            "node {id} commits ({}, {:?}) at {index}; ({epoch}, {payload:?}) was committed there first",
                            e.epoch, e.payload
                        ));
                    }
                    Some(_) => {}
                    None => {
                        if let Some(&acked) = self.acked_at.get(&index)
                            && Some(acked) != e.payload
                        {
                            return Err(format!(
                                "acknowledged {acked} at {index} lost: {:?} is there",
                                e.payload
                            ));
                        }
                        self.truth.insert(index, (e.epoch, e.payload));
                    }
                }
            }
            n.checked = committed.len() as Index;
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        let Some(leader) = self.nodes.values().find(|n| n.up && n.replica.serving().is_some())
        else {
            return false;
        };
        let len = leader.replica.log().len() as Index;
        let max_acked = self.acked.values().copied().max().unwrap_or(0);
        len >= max_acked
            && self.acked.len() >= 5
            && self.old_set.is_empty()
            && self.set.iter().all(|id| {
                let n = &self.nodes[id];
                n.up && n.replica.commit_index() == len
            })
    }

    fn final_check(&self) -> Result<(), String> {
        if self.acked.is_empty() {
            return Err("nothing was acknowledged".into());
        }
        let first_id = self.set.iter().next().expect("a set");
        let first = self.nodes[first_id].replica.committed().to_vec();
        for id in &self.set {
            let n = &self.nodes[id];
            if n.replica.committed() != first.as_slice() {
                return Err(format!("node {id} ends with a different committed log"));
            }
        }
        for (payload, index) in &self.acked {
            let held = first.get(*index as usize - 1).and_then(|e| e.payload);
            if held != Some(*payload) {
                return Err(format!("acknowledged {payload} at {index} missing at the end"));
            }
        }
        // Committed payloads are unique: a payload never lands twice.
        let payloads: Vec<u64> = first.iter().filter_map(|e| e.payload).collect();
        let distinct: BTreeSet<u64> = payloads.iter().copied().collect();
        if distinct.len() != payloads.len() {
            return Err("a payload was committed twice".into());
        }
        Ok(())
    }
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    (1..=n).collect()
}

fn run_seeds(nodes: u64, replicas: u64) {
    let (mut acked, mut epochs, mut runs, mut changes) = (0, 0, 0, 0);
    for seed in seeds() {
        let mut sim = Sim::new(seed, nodes, replicas);
        if let Err(why) = sim.run() {
            let tail = sim.log.iter().rev().take(40).rev().cloned().collect::<Vec<_>>().join("\n");
            panic!(
                "seed {seed} ({replicas} replicas) failed: {why}\nreplay: SIM_SEED={seed} cargo test -p switchboard-broker cluster::sim -- --nocapture\nlast events:\n{tail}"
            );
        }
        if std::env::var("SIM_SEED").is_ok() {
            eprintln!(
                "seed {seed}: {} events, {} acknowledged, {} epochs, log {}, faults drop {} dup {} delay {}",
                sim.seq,
                sim.acked.len(),
                sim.epoch,
                sim.truth.len(),
                sim.faults.drop,
                sim.faults.duplicate,
                sim.faults.max_delay
            );
        }
        acked += sim.acked.len();
        epochs += sim.epoch;
        changes += sim.set_changes;
        runs += 1;
    }
    eprintln!(
        "{runs} runs, {nodes} nodes, {replicas} replicas: {acked} entries acknowledged, {epochs} epochs, {changes} set changes"
    );
    assert!(acked > 0);
    if nodes > replicas {
        assert!(changes > 0, "no run moved the replica set");
    }
}

#[test]
fn given_lossy_network_crashes_and_epoch_changes_three_replicas_should_never_lose_or_diverge() {
    run_seeds(3, 3);
}

#[test]
fn given_lossy_network_crashes_and_epoch_changes_five_replicas_should_never_lose_or_diverge() {
    run_seeds(5, 5);
}

#[test]
fn given_replica_set_changes_under_faults_should_never_lose_or_diverge() {
    run_seeds(5, 3);
}

/// Delivers every message in `outs` (and the replies they cause) among `replicas`, syncing
/// every replica after each delivery, until nothing is left; `pass(from, to, msg)` decides
/// which messages arrive. Returns what was not a message.
fn settle_where<T: Clone + PartialEq + std::fmt::Debug + super::replica::Weigh>(
    replicas: &mut [&mut Replica<T>],
    from: NodeId,
    outs: Vec<Out<T>>,
    pass: impl Fn(NodeId, NodeId, &Msg<T>) -> bool,
) -> Vec<Out<T>> {
    let mut rest = Vec::new();
    let mut queue: Vec<(NodeId, Out<T>)> = outs.into_iter().map(|o| (from, o)).collect();
    while let Some((sender, out)) = queue.pop() {
        match out {
            Out::Send { to, msg } => {
                if !pass(sender, to, &msg) {
                    continue;
                }
                let Some(r) = replicas.iter_mut().find(|r| r.id() == to) else { continue };
                let mut produced = r.handle(sender, msg);
                produced.extend(r.synced());
                queue.extend(produced.into_iter().map(|o| (to, o)));
            }
            other => rest.push(other),
        }
    }
    rest
}

fn settle<T: Clone + PartialEq + std::fmt::Debug + super::replica::Weigh>(
    replicas: &mut [&mut Replica<T>],
    from: NodeId,
    outs: Vec<Out<T>>,
) -> Vec<Out<T>> {
    settle_where(replicas, from, outs, |_, _, _| true)
}

/// `r` leads `epoch` and syncs at once (its promise and marker durable): what it sends.
fn lead_synced<T: Clone + PartialEq + std::fmt::Debug + super::replica::Weigh>(
    r: &mut Replica<T>,
    epoch: Epoch,
    set: BTreeSet<NodeId>,
    old: BTreeSet<NodeId>,
) -> Vec<Out<T>> {
    let mut outs = r.lead(epoch, set, old);
    outs.extend(r.synced());
    outs
}

/// Appends `n` payloads on `leader` and replicates them to the others until all commit.
fn commit_all(replicas: &mut [&mut Replica<u64>], leader: usize, n: u64) {
    for v in 0..n {
        let (_, mut outs) = replicas[leader].append(v).expect("serving");
        outs.extend(replicas[leader].synced());
        let id = replicas[leader].id();
        let _ = settle(replicas, id, outs);
    }
    let id = replicas[leader].id();
    let outs = replicas[leader].announce_commit();
    let _ = settle(replicas, id, outs);
}

#[test]
fn given_a_committed_history_a_new_leader_should_be_promised_only_what_follows_it() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut a: Replica<u64> = Replica::recover(1, Durable::default());
    let mut b: Replica<u64> = Replica::recover(2, Durable::default());
    let mut c: Replica<u64> = Replica::recover(3, Durable::default());
    let outs = lead_synced(&mut a, 1, set.clone(), BTreeSet::new());
    let _ = settle(&mut [&mut a, &mut b, &mut c], 1, outs);
    commit_all(&mut [&mut a, &mut b, &mut c], 0, 100);
    assert_eq!(b.commit_index(), 101, "followers learned the commit point");
    // c misses the last entry; b leads epoch 2 from its commit point.
    let (_, outs) = a.append(1000).expect("serving");
    let _ = a.synced();
    let _ = settle_where(&mut [&mut a, &mut b, &mut c], 1, outs, |_, to, _| to == 2);
    let outs = b.lead(2, set, BTreeSet::new());
    let promise = outs.iter().find_map(|o| match o {
        Out::Send { to: 3, msg: Msg::Promise { base, base_epoch, .. } } => {
            Some((*base, *base_epoch))
        }
        _ => None,
    });
    assert_eq!(promise, Some((101, 1)), "the base is b's commit point");
    let replies = c.handle(2, Msg::Promise { epoch: 2, base: 101, base_epoch: 1 });
    let promised = replies.iter().find_map(|o| match o {
        Out::Send { msg: Msg::Promised { len, after_base, .. }, .. } => {
            Some((*len, after_base.clone().map(|log| (101, log))))
        }
        _ => None,
    });
    assert_eq!(promised, Some((101, Some((101, Vec::new())))), "nothing after the base travels");
    // A replica that does not hold the base says so and carries nothing.
    let mut d: Replica<u64> = Replica::recover(4, Durable::default());
    let replies = d.handle(2, Msg::Promise { epoch: 2, base: 101, base_epoch: 1 });
    assert!(replies.iter().any(|o| matches!(
        o,
        Out::Send { msg: Msg::Promised { len: 0, after_base: None, .. }, .. }
    )));
    // The new leader adopts the longest log (its own: 102 entries), serves, and c catches up.
    let mut outs = outs;
    outs.extend(b.synced());
    let _ = settle(&mut [&mut a, &mut b, &mut c], 2, outs);
    assert_eq!(b.serving(), Some(2));
    let outs = b.announce_commit();
    let _ = settle(&mut [&mut a, &mut b, &mut c], 2, outs);
    assert_eq!(c.committed(), b.committed(), "c holds the whole committed log");
    assert_eq!(c.committed()[101].payload, Some(1000));
}

#[test]
fn given_a_settled_set_change_the_leader_should_commit_without_the_old_set() {
    let (old, new): (BTreeSet<NodeId>, BTreeSet<NodeId>) = ([1, 2, 3].into(), [1, 2, 4].into());
    let mut r: Vec<Replica<u64>> =
        (1..=4).map(|id| Replica::recover(id, Durable::default())).collect();
    let [a, b, c, d] = &mut r[..] else { unreachable!() };
    let outs = lead_synced(a, 1, old.clone(), BTreeSet::new());
    let _ = settle(&mut [&mut *a, &mut *b, &mut *c, &mut *d], 1, outs);
    // Epoch 2 moves the set from {1,2,3} to {1,2,4}; 1 leads and serves in it.
    let outs = lead_synced(a, 2, new, old);
    let _ = settle(&mut [&mut *a, &mut *b, &mut *c, &mut *d], 1, outs);
    assert_eq!(a.serving(), Some(2));
    // 2 and 3 are lost: the old set has no majority left, the new one has {1, 4}.
    let lost =
        |from: NodeId, to: NodeId, _: &Msg<u64>| ![2, 3].contains(&from) && ![2, 3].contains(&to);
    let (index, mut outs) = a.append(7).expect("serving");
    outs.extend(a.synced());
    let _ = settle_where(&mut [&mut *a, &mut *b, &mut *c, &mut *d], 1, outs, lost);
    assert!(a.commit_index() < index, "unsettled, the old set's majority is still needed");
    // Not serving that epoch: ignored.
    assert!(a.settle(1).is_empty());
    assert!(a.commit_index() < index);
    // Settled: the new set's majority (1 and 4 hold it) commits it at once.
    let outs = a.settle(2);
    assert!(outs.contains(&Out::Committed(index)), "{outs:?}");
    let (index, mut outs) = a.append(8).expect("serving");
    outs.extend(a.synced());
    let _ = settle_where(&mut [&mut *a, &mut *b, &mut *c, &mut *d], 1, outs, lost);
    assert_eq!(a.commit_index(), index);
}

#[test]
fn given_a_promiser_without_the_base_should_catch_up_from_its_committed_prefix() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let e = |epoch, v| Entry { epoch, payload: Some(v) };
    // b holds the committed log: epoch 1 up to 11, then epoch 2 up to 212.
    let mut good = vec![Entry { epoch: 1, payload: None }];
    good.extend((2..=11).map(|v| e(1, v)));
    good.push(Entry { epoch: 2, payload: None });
    good.extend((13..=212).map(|v| e(2, v)));
    let mut b = Replica::recover(2, Durable { promised: 2, log: good.clone(), committed: 212 });
    // c was cut off after 11, holding five stale entries of epoch 1 that never committed.
    let mut stale = good[..11].to_vec();
    stale.extend((12..=16).map(|v| e(1, 1000 + v)));
    let mut c = Replica::recover(3, Durable { promised: 2, log: stale, committed: 11 });
    let mut a: Replica<u64> = Replica::recover(1, Durable::default());
    // b leads epoch 3 from base 212 with c (a is down): c does not hold the base, so it
    // promises its length and committed prefix only, and is caught up from there: no
    // back-off through its stale tail.
    let outs = lead_synced(&mut b, 3, set, BTreeSet::new());
    let mismatches = std::cell::Cell::new(0);
    let up = |from: NodeId, to: NodeId, m: &Msg<u64>| {
        if matches!(m, Msg::Mismatch { .. }) {
            mismatches.set(mismatches.get() + 1);
        }
        from != 1 && to != 1
    };
    let _ = settle_where(&mut [&mut a, &mut b, &mut c], 2, outs, up);
    let outs = b.announce_commit();
    let _ = settle_where(&mut [&mut a, &mut b, &mut c], 2, outs, up);
    assert_eq!(b.serving(), Some(3));
    assert_eq!(c.committed(), b.committed());
    assert_eq!(&c.committed()[..212], &good[..], "c's stale tail was replaced");
    assert_eq!(mismatches.get(), 0, "appends started where c's log matched");
}

#[test]
fn given_a_new_replica_leading_a_long_log_should_fetch_the_adopted_log_in_chunks() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut log = vec![Entry { epoch: 1, payload: None }];
    log.extend((2..=200).map(|v| Entry { epoch: 1, payload: Some(v) }));
    let mut a = Replica::recover(1, Durable { promised: 1, log: log.clone(), committed: 200 });
    let mut b = Replica::recover(2, Durable { promised: 1, log: log.clone(), committed: 200 });
    // c is new (a move onto a node that holds nothing): its base is 0.
    let mut c: Replica<u64> = Replica::recover(3, Durable::default());
    let outs = lead_synced(&mut c, 2, set, BTreeSet::new());
    let chunks = std::cell::RefCell::new(Vec::new());
    let _ = settle_where(&mut [&mut a, &mut b, &mut c], 3, outs, |_, _, m| {
        if let Msg::Promised { after_base: Some(log), .. } = m {
            chunks.borrow_mut().push(log.len());
        }
        true
    });
    let chunks = chunks.into_inner();
    assert!(chunks.iter().all(|&n| n <= MAX_APPEND as usize), "{chunks:?}");
    assert_eq!(
        chunks.iter().sum::<usize>(),
        64 * 2 + 200 - 64,
        "two first chunks, then one log's rest"
    );
    assert_eq!(&c.log()[..200], &log[..]);
    let outs = c.announce_commit();
    let _ = settle(&mut [&mut a, &mut b, &mut c], 3, outs);
    assert_eq!(c.serving(), Some(2));
    assert_eq!(a.committed(), c.committed());
}

#[test]
fn given_a_base_that_was_not_committed_the_leader_should_promise_again_from_the_start() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let e = |epoch, v| Entry { epoch, payload: Some(v) };
    // a and b hold entries 2..=3 of epoch 2 (committed); c claims (wrongly) that its stale
    // entry 2 of epoch 1 is committed.
    let good = vec![Entry { epoch: 1, payload: None }, e(2, 20), e(2, 30)];
    let mut a = Replica::recover(1, Durable { promised: 2, log: good.clone(), committed: 3 });
    let mut b = Replica::recover(2, Durable { promised: 2, log: good.clone(), committed: 3 });
    let stale = vec![Entry { epoch: 1, payload: None }, e(1, 99)];
    let mut c = Replica::recover(3, Durable { promised: 2, log: stale, committed: 2 });
    let outs = lead_synced(&mut c, 3, set, BTreeSet::new());
    let _ = settle(&mut [&mut a, &mut b, &mut c], 3, outs);
    assert_eq!(c.fallbacks(), 1);
    assert_eq!(&c.log()[..3], &good[..], "the committed entries were adopted, not lost");
    assert_eq!(c.serving(), Some(3));
}

#[test]
fn given_messages_no_leader_could_have_sent_a_replica_should_ignore_them_without_panicking() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut a: Replica<u64> = Replica::recover(1, Durable::default());
    let mut b: Replica<u64> = Replica::recover(2, Durable::default());
    let outs = lead_synced(&mut a, 1, set, BTreeSet::new());
    let _ = settle(&mut [&mut a, &mut b], 1, outs);
    assert_eq!(a.serving(), Some(1));
    let log = a.log().to_vec();
    // Acknowledging entries the leader never had; a log length at the top of the range; an
    // append of the leader's own epoch from someone else.
    assert!(a.handle(2, Msg::Appended { epoch: 1, index: u64::MAX }).is_empty());
    assert!(a.handle(3, Msg::Appended { epoch: 1, index: u64::MAX }).is_empty());
    let _ = a.handle(2, Msg::Mismatch { epoch: 1, prev_index: 1, len: u64::MAX });
    let forged =
        Msg::Append { epoch: 1, prev_index: 0, prev_epoch: 0, entries: Vec::new(), commit: 9 };
    assert!(a.handle(3, forged).is_empty());
    assert_eq!(a.log(), &log[..]);
    assert_eq!(a.commit_index(), 1);
}

#[test]
fn given_a_restarted_replica_should_take_its_applied_index_as_committed() {
    let log: Vec<Entry<u64>> = (0..5).map(|v| Entry { epoch: 1, payload: Some(v) }).collect();
    let r = Replica::recover(1, Durable { promised: 1, log: log.clone(), committed: 3 });
    assert_eq!(r.commit_index(), 3);
    let r = Replica::recover(1, Durable { promised: 1, log, committed: 9 });
    assert_eq!(r.commit_index(), 5, "never beyond its own log");
}

#[test]
fn given_large_payloads_an_append_should_stop_at_its_byte_limit_but_carry_at_least_one() {
    use super::replica::MAX_APPEND_BYTES;
    let set: BTreeSet<NodeId> = [1, 2].into();
    let mut a: Replica<bytes::Bytes> = Replica::recover(1, Durable::default());
    let mut b: Replica<bytes::Bytes> = Replica::recover(2, Durable::default());
    let outs = lead_synced(&mut a, 1, set, BTreeSet::new());
    let _ = settle(&mut [&mut a, &mut b], 1, outs);
    let big = bytes::Bytes::from(vec![7u8; MAX_APPEND_BYTES * 3 / 4]);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let (_, outs) = a.append(big.clone()).expect("serving");
        sizes.extend(outs.iter().filter_map(|o| match o {
            Out::Send { msg: Msg::Append { entries, .. }, .. } => Some(entries.len()),
            _ => None,
        }));
    }
    assert_eq!(sizes, vec![1, 1, 1], "each new entry is pipelined on its own");
    // Those appends are lost: a tick resends from what the follower holds, by the byte limit.
    let outs = a.tick();
    let carried: Vec<usize> = outs
        .iter()
        .filter_map(|o| match o {
            Out::Send { msg: Msg::Append { entries, .. }, .. } => Some(entries.len()),
            _ => None,
        })
        .collect();
    assert_eq!(carried, vec![1], "3/4 of the limit each: two would exceed it");
    let _ = a.synced();
    let _ = settle(&mut [&mut a, &mut b], 1, outs);
    assert_eq!(a.commit_index(), 4, "all three commit, one append each");
}

#[test]
fn given_a_single_replica_should_commit_its_epoch_marker_then_serve() {
    let mut r: Replica<u64> = Replica::recover(1, Durable::default());
    let outs = r.lead(1, [1].into(), BTreeSet::new());
    assert!(outs.is_empty());
    assert_eq!(r.serving(), None, "the epoch marker is not durable yet");
    assert_eq!(r.synced(), vec![Out::Committed(1)]);
    assert_eq!(r.serving(), Some(1));
    let (index, _) = r.append(7).expect("serving");
    assert_eq!(index, 2);
    assert_eq!(r.commit_index(), 1, "not durable yet");
    assert_eq!(r.synced(), vec![Out::Committed(2)]);
    assert_eq!(r.committed()[1].payload, Some(7));
}

#[test]
fn given_a_newer_promise_a_superseded_leader_should_not_commit() {
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut a: Replica<u64> = Replica::recover(1, Durable::default());
    let mut b: Replica<u64> = Replica::recover(2, Durable::default());
    let mut c: Replica<u64> = Replica::recover(3, Durable::default());
    // a leads epoch 1 with b's promise (c is unreachable).
    let mut outs = lead_synced(&mut a, 1, set.clone(), BTreeSet::new());
    outs.retain(|o| !matches!(o, Out::Send { to: 3, .. }));
    let _ = settle(&mut [&mut a, &mut b], 1, outs);
    assert_eq!(a.serving(), Some(1));
    // c leads epoch 2 with b's promise: b is fenced against epoch 1.
    let _ = c.lead(2, set, BTreeSet::new());
    let _ = b.handle(3, Msg::Promise { epoch: 2, base: 0, base_epoch: 0 });
    let (_, outs) = a.append(9).expect("a still thinks it serves");
    let _ = a.synced();
    for o in outs {
        if let Out::Send { to: 2, msg } = o {
            let replies = b.handle(1, msg);
            assert!(
                replies
                    .iter()
                    .all(|r| matches!(r, Out::Send { msg: Msg::Stale { promised: 2 }, .. })),
                "{replies:?}"
            );
        }
    }
    assert_eq!(a.commit_index(), 1, "one durable copy of two is not a majority: only the marker");
}

#[test]
fn given_a_straggler_ending_in_a_newer_epoch_should_not_overwrite_a_committed_entry() {
    // Raft's figure 8 in this protocol (what seed 12853 found before the epoch marker).
    let set: BTreeSet<NodeId> = [1, 2, 3].into();
    let mut n1: Replica<u64> = Replica::recover(1, Durable::default());
    let mut n2: Replica<u64> = Replica::recover(2, Durable::default());
    let mut n3: Replica<u64> = Replica::recover(3, Durable::default());
    // Epoch 1, leader n1, everyone reachable: its marker commits; then X is appended while n1
    // is cut off, so only n1 holds it.
    let outs = lead_synced(&mut n1, 1, set.clone(), BTreeSet::new());
    let _ = settle(&mut [&mut n1, &mut n2, &mut n3], 1, outs);
    assert_eq!(n1.serving(), Some(1));
    let (x_index, _) = n1.append(42).expect("serving");
    let _ = n1.synced();
    // Epoch 2, leader n2 with n3's promise; its marker never reaches n3: n2 is a straggler whose
    // log ends in epoch 2, uncommitted.
    let outs = lead_synced(&mut n2, 2, set.clone(), BTreeSet::new());
    let _ =
        settle_where(&mut [&mut n2, &mut n3], 2, outs, |_, _, m| !matches!(m, Msg::Append { .. }));
    assert_eq!(n2.log().last().map(|e| e.epoch), Some(2));
    // Epoch 3, leader n1 with n3's promise: adopts its own log (it holds X), commits its
    // marker, and X with it.
    let outs = lead_synced(&mut n1, 3, set.clone(), BTreeSet::new());
    let _ = settle(&mut [&mut n1, &mut n3], 1, outs);
    assert_eq!(n1.serving(), Some(3));
    assert!(n1.commit_index() > x_index, "X committed with the epoch-3 marker");
    let committed = n1.committed().to_vec();
    // Epoch 4, leader n2 with n3's promise: n3's log (ending in epoch 3) must win over n2's
    // own (ending in epoch 2), so X survives.
    let outs = lead_synced(&mut n2, 4, set, BTreeSet::new());
    let _ = settle(&mut [&mut n2, &mut n3], 2, outs);
    assert_eq!(n2.serving(), Some(4));
    assert_eq!(&n2.committed()[..committed.len()], committed.as_slice());
    assert_eq!(n2.committed()[x_index as usize - 1].payload, Some(42));
}
