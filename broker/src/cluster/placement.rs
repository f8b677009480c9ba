//! Partition placement by rendezvous (highest-random-weight) hashing.
//!
//! Given the cluster's members and a replication factor R, every one of the
//! [`PARTITION_COUNT`] partitions gets an ordered replica set of `min(R, members)` distinct
//! nodes: the nodes with the highest scores for that partition, best first. The first node is
//! the partition's *preferred leader*. Nothing here does I/O or keeps state: a [`Placement`] is
//! a pure function of (members, weights, R), so any node that knows the membership computes the
//! same table, and the control plane (Raft) only has to record which table an epoch uses.
//!
//! ## Score
//! `score(p, n) = xxh3_64(p as u16 big-endian ‖ n as u64 big-endian)`: 10 bytes, no seed. This
//! encoding is part of the cluster's compatibility surface (two versions that scored
//! differently would disagree on every replica set); a test pins a few values.
//!
//! When every member has the same weight, nodes are ranked by the raw 64-bit score (integer
//! comparison, exact and platform independent). When weights differ, the standard weighted
//! rendezvous score `-w / ln(u)` is used, with `u` the score mapped into (0, 1); a node then
//! becomes the top choice for a share of partitions proportional to its weight. That path uses
//! floating point `ln`, so placements with unequal weights should be computed in one place (the
//! Raft leader) and recorded, not recomputed independently on machines with different math
//! libraries. Ties (astronomically rare) are broken by the higher node id.
//!
//! ## Why rendezvous hashing
//! Adding a node only moves replica slots *onto* that node (about `R / (N + 1)` of all
//! partitions gain it), and removing a node only moves the slots it held; no other partition's
//! set or order changes. The relative order of the surviving nodes in every set is unchanged,
//! so a leader changes only when the new node outranks it or the old leader leaves. The price
//! is statistical balance: with 1,024 partitions the per-node counts are binomial, so the
//! spread of *leaders* per node grows with the cluster (coefficient of variation about
//! `sqrt(N / 1024)`); see `docs/capacity.md` and the `placement_sim` example.
//!
//! ## Epoch changes
//! [`Placement::diff`] lists what moving from one placement to another costs: the partitions
//! whose replica set or preferred leader changes, the replica slots to copy (a node that
//! gains a partition must receive its data) and the slots to drop.

use std::collections::BTreeMap;

use xxhash_rust::xxh3::xxh3_64;

pub use super::NodeId;

/// A partition id, `0..PARTITION_COUNT` (see [`crate::shard::partition`]).
pub type PartitionId = u16;

/// Number of partitions placed ([`crate::shard::PARTITIONS`]).
pub const PARTITION_COUNT: usize = crate::shard::PARTITIONS as usize;

/// A set of partitions (a bitmap of [`PARTITION_COUNT`] bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSet(Vec<u64>);

impl Default for PartitionSet {
    fn default() -> Self {
        Self(vec![0; PARTITION_COUNT.div_ceil(64)])
    }
}

impl PartitionSet {
    /// Every partition.
    #[must_use]
    pub fn all() -> Self {
        let mut s = Self::default();
        for p in 0..PARTITION_COUNT {
            s.insert(u16::try_from(p).unwrap_or(u16::MAX));
        }
        s
    }

    /// Adds `p`.
    pub fn insert(&mut self, p: PartitionId) {
        if let Some(w) = self.0.get_mut(usize::from(p) / 64) {
            *w |= 1 << (p % 64);
        }
    }

    /// Whether `p` is in the set.
    #[must_use]
    pub fn contains(&self, p: PartitionId) -> bool {
        self.0.get(usize::from(p) / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    /// Whether no partition is in the set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The partitions in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = PartitionId> + '_ {
        (0..PARTITION_COUNT)
            .filter_map(|p| PartitionId::try_from(p).ok())
            .filter(|p| self.contains(*p))
    }

    /// Little-endian words, for the wire.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The inverse of [`PartitionSet::to_bytes`]; `None` for a wrong length.
    #[must_use]
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != PARTITION_COUNT.div_ceil(64) * 8 {
            return None;
        }
        let words =
            b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
        Some(Self(words))
    }
}

// Partition ids are u16.
const _: () = assert!(crate::shard::PARTITIONS <= 1 << 16);

/// Default replication factor: each partition lives on three nodes.
pub const DEFAULT_REPLICATION: usize = 3;

/// A cluster member: its id and its relative capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Member {
    /// The node's id.
    pub id: NodeId,
    /// Relative capacity (for example the node's shard count); at least 1. A node of weight 2
    /// is the preferred leader of about twice as many partitions as a node of weight 1.
    pub weight: u32,
}

impl Member {
    /// A member of weight 1.
    #[must_use]
    pub fn new(id: NodeId) -> Self {
        Self { id, weight: 1 }
    }

    /// A member with the given weight (capacity).
    #[must_use]
    pub fn weighted(id: NodeId, weight: u32) -> Self {
        Self { id, weight }
    }
}

/// Why a placement could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The member list was empty.
    #[error("placement needs at least one member")]
    NoMembers,
    /// The replication factor was 0.
    #[error("replication factor must be at least 1")]
    ZeroReplication,
    /// The same node id appeared twice in the member list.
    #[error("node {0} appears more than once")]
    DuplicateNode(NodeId),
    /// A member had weight 0.
    #[error("node {0} has weight 0")]
    ZeroWeight(NodeId),
}

/// The rendezvous score of a node for a partition: `xxh3_64` of the partition (u16, big
/// endian) followed by the node id (u64, big endian). Higher wins.
#[must_use]
pub fn score(partition: PartitionId, node: NodeId) -> u64 {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(&partition.to_be_bytes());
    key[2..].copy_from_slice(&node.to_be_bytes());
    xxh3_64(&key)
}

/// The weighted rendezvous score `-weight / ln(u)`, where `u` in (0, 1) is [`score`] scaled
/// down (its top 53 bits, offset by half a step so `u` is never 0 or 1). For equal weights it
/// ranks nodes as [`score`] does.
#[must_use]
pub fn weighted_score(partition: PartitionId, member: Member) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    let u = ((score(partition, member.id) >> 11) as f64 + 0.5) * SCALE;
    -f64::from(member.weight) / u.ln()
}

/// Ranks `members` for one partition and returns the best `k` node ids, best first.
fn top_k(partition: PartitionId, members: &[Member], k: usize, weighted: bool) -> Vec<NodeId> {
    if weighted {
        // Scores are finite and positive; ties go to the higher id.
        best_k(
            members.iter().map(|m| (weighted_score(partition, *m), m.id)).collect(),
            k,
            |a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)),
        )
    } else {
        best_k(members.iter().map(|m| (score(partition, m.id), m.id)).collect(), k, |a, b| b.cmp(a))
    }
}

/// The ids of the first `k` of `ranked` in the order `by_rank`, without sorting the rest.
fn best_k<S>(
    mut ranked: Vec<(S, NodeId)>,
    k: usize,
    by_rank: impl Fn(&(S, NodeId), &(S, NodeId)) -> std::cmp::Ordering,
) -> Vec<NodeId> {
    let k = k.min(ranked.len());
    if k > 0 && k < ranked.len() {
        ranked.select_nth_unstable_by(k - 1, &by_rank);
    }
    ranked.truncate(k);
    ranked.sort_unstable_by(&by_rank);
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// Every partition's ordered replica set for one membership and replication factor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Members, sorted by id.
    members: Vec<Member>,
    /// The requested replication factor.
    replication: usize,
    /// `min(replication, members.len())`: the length of every replica set.
    width: usize,
    /// `PARTITION_COUNT * width` node ids: partition `p`'s set is `sets[p * width..][..width]`.
    sets: Vec<NodeId>,
}

impl Placement {
    /// Places every partition on `min(replication, members.len())` distinct members by
    /// rendezvous hashing. The order of `members` does not matter.
    ///
    /// # Errors
    /// [`PlacementError`] if `members` is empty, contains a node id twice or a weight of 0, or
    /// if `replication` is 0.
    pub fn new(members: &[Member], replication: usize) -> Result<Self, PlacementError> {
        if members.is_empty() {
            return Err(PlacementError::NoMembers);
        }
        if replication == 0 {
            return Err(PlacementError::ZeroReplication);
        }
        let mut sorted = members.to_vec();
        sorted.sort_unstable_by_key(|m| m.id);
        for pair in sorted.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(PlacementError::DuplicateNode(pair[0].id));
            }
        }
        if let Some(m) = sorted.iter().find(|m| m.weight == 0) {
            return Err(PlacementError::ZeroWeight(m.id));
        }
        let weighted = sorted.iter().any(|m| m.weight != sorted[0].weight);
        let width = replication.min(sorted.len());
        let mut sets = Vec::with_capacity(PARTITION_COUNT * width);
        for p in 0..PARTITION_COUNT {
            #[allow(clippy::cast_possible_truncation)] // PARTITION_COUNT <= 1 << 16
            let p = p as PartitionId;
            sets.extend(top_k(p, &sorted, width, weighted));
        }
        Ok(Self { members: sorted, replication, width, sets })
    }

    /// [`Placement::new`] with every node at weight 1.
    ///
    /// # Errors
    /// As [`Placement::new`].
    pub fn uniform(
        nodes: impl IntoIterator<Item = NodeId>,
        replication: usize,
    ) -> Result<Self, PlacementError> {
        let members: Vec<Member> = nodes.into_iter().map(Member::new).collect();
        Self::new(&members, replication)
    }

    /// The members this placement was computed for, sorted by id.
    #[must_use]
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The requested replication factor R.
    #[must_use]
    pub fn replication(&self) -> usize {
        self.replication
    }

    /// The length of every replica set: `min(R, members)`. Below R the cluster cannot survive
    /// the loss of `R / 2` nodes as the design promises.
    #[must_use]
    pub fn effective_replication(&self) -> usize {
        self.width
    }

    /// The ordered replica set of a partition; the first node is the preferred leader.
    ///
    /// # Panics
    /// If `partition >= PARTITION_COUNT`.
    #[must_use]
    pub fn replicas(&self, partition: PartitionId) -> &[NodeId] {
        let p = usize::from(partition);
        assert!(p < PARTITION_COUNT, "partition {partition} out of range");
        &self.sets[p * self.width..(p + 1) * self.width]
    }

    /// The preferred leader of a partition (the first node of its replica set).
    ///
    /// # Panics
    /// If `partition >= PARTITION_COUNT`.
    #[must_use]
    pub fn leader(&self, partition: PartitionId) -> NodeId {
        self.replicas(partition)[0]
    }

    /// Every partition with its replica set, in partition order.
    pub fn iter(&self) -> impl Iterator<Item = (PartitionId, &[NodeId])> + '_ {
        self.sets.chunks_exact(self.width).enumerate().map(|(p, set)| {
            #[allow(clippy::cast_possible_truncation)] // PARTITION_COUNT <= 1 << 16
            let p = p as PartitionId;
            (p, set)
        })
    }

    /// How many partitions each member leads and holds a replica of, one entry per member in
    /// id order (members with nothing are included with zeros).
    #[must_use]
    pub fn loads(&self) -> Vec<NodeLoad> {
        let index: BTreeMap<NodeId, usize> =
            self.members.iter().enumerate().map(|(i, m)| (m.id, i)).collect();
        let mut loads: Vec<NodeLoad> = self
            .members
            .iter()
            .map(|m| NodeLoad { node: m.id, weight: m.weight, leaders: 0, replicas: 0 })
            .collect();
        for (_, set) in self.iter() {
            for (rank, node) in set.iter().enumerate() {
                let load = &mut loads[index[node]];
                load.replicas += 1;
                if rank == 0 {
                    load.leaders += 1;
                }
            }
        }
        loads
    }

    /// What changes from `self` to `next`: the work of an epoch change that adopts `next`.
    #[must_use]
    pub fn diff(&self, next: &Placement) -> PlacementDiff {
        let mut changes = Vec::new();
        for ((partition, before), (_, after)) in self.iter().zip(next.iter()) {
            if before == after {
                continue;
            }
            // Replica sets hold R (about three) nodes: a scan beats hashing.
            changes.push(PartitionChange {
                partition,
                before: before.to_vec(),
                after: after.to_vec(),
                added: after.iter().copied().filter(|n| !before.contains(n)).collect(),
                removed: before.iter().copied().filter(|n| !after.contains(n)).collect(),
            });
        }
        PlacementDiff { changes, slots_before: self.sets.len(), slots_after: next.sets.len() }
    }
}

/// One member's share of a placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeLoad {
    /// The node.
    pub node: NodeId,
    /// Its weight.
    pub weight: u32,
    /// Partitions it is the preferred leader of.
    pub leaders: usize,
    /// Partitions it holds a replica of (leader included).
    pub replicas: usize,
}

/// One partition whose replica set or order differs between two placements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionChange {
    /// The partition.
    pub partition: PartitionId,
    /// Its replica set before, preferred leader first.
    pub before: Vec<NodeId>,
    /// Its replica set after, preferred leader first.
    pub after: Vec<NodeId>,
    /// Nodes that gain a replica (each must be sent the partition's data), in `after` order.
    pub added: Vec<NodeId>,
    /// Nodes that lose their replica (each may drop the partition's data), in `before` order.
    pub removed: Vec<NodeId>,
}

impl PartitionChange {
    /// Whether the set of nodes differs (not just their order).
    #[must_use]
    pub fn set_changed(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty()
    }

    /// Whether the preferred leader differs.
    #[must_use]
    pub fn leader_changed(&self) -> bool {
        self.before.first() != self.after.first()
    }

    /// Whether the old preferred leader is no longer a replica at all (its leadership cannot
    /// be handed over by the node itself, as when it left the cluster).
    #[must_use]
    pub fn leader_removed(&self) -> bool {
        self.before.first().is_some_and(|l| self.removed.contains(l))
    }
}

/// The difference between two placements ([`Placement::diff`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementDiff {
    /// Partitions whose replica set or its order changed, in partition order.
    pub changes: Vec<PartitionChange>,
    /// Replica slots in the old placement (`PARTITION_COUNT * width`).
    pub slots_before: usize,
    /// Replica slots in the new placement.
    pub slots_after: usize,
}

impl PlacementDiff {
    /// Whether the two placements are identical.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Partitions whose set of replica nodes changed.
    #[must_use]
    pub fn partitions_changed(&self) -> usize {
        self.changes.iter().filter(|c| c.set_changed()).count()
    }

    /// Partitions whose preferred leader changed.
    #[must_use]
    pub fn leader_changes(&self) -> usize {
        self.changes.iter().filter(|c| c.leader_changed()).count()
    }

    /// Replica slots added on a node that did not hold them: partition copies to transfer.
    #[must_use]
    pub fn slots_copied(&self) -> usize {
        self.changes.iter().map(|c| c.added.len()).sum()
    }

    /// Replica slots removed from a node that held them.
    #[must_use]
    pub fn slots_dropped(&self) -> usize {
        self.changes.iter().map(|c| c.removed.len()).sum()
    }

    /// The fraction of all stored data (all replicas, after the change) that has to be copied,
    /// assuming data is spread uniformly over partitions: `slots_copied / slots_after`.
    #[must_use]
    pub fn fraction_copied(&self) -> f64 {
        if self.slots_after == 0 {
            return 0.0;
        }
        self.slots_copied() as f64 / self.slots_after as f64
    }

    /// Replica slots each node gains (only nodes that gain any).
    #[must_use]
    pub fn copies_by_node(&self) -> BTreeMap<NodeId, usize> {
        let mut by = BTreeMap::new();
        for n in self.changes.iter().flat_map(|c| &c.added) {
            *by.entry(*n).or_insert(0) += 1;
        }
        by
    }

    /// Replica slots each node loses (only nodes that lose any).
    #[must_use]
    pub fn drops_by_node(&self) -> BTreeMap<NodeId, usize> {
        let mut by = BTreeMap::new();
        for n in self.changes.iter().flat_map(|c| &c.removed) {
            *by.entry(*n).or_insert(0) += 1;
        }
        by
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn nodes(n: u64) -> Placement {
        Placement::uniform(1..=n, DEFAULT_REPLICATION).unwrap()
    }

    fn all_partitions() -> impl Iterator<Item = PartitionId> {
        (0..PARTITION_COUNT).map(|p| PartitionId::try_from(p).unwrap())
    }

    #[test]
    fn given_fixed_encoding_when_scoring_should_match_pinned_values() {
        // The score is part of the cluster's compatibility surface: changing the encoding or
        // the hash re-places every partition. These values pin it.
        assert_eq!(score(0, 1), xxh3_64(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(score(0x0102, 0x0304), xxh3_64(&[1, 2, 0, 0, 0, 0, 0, 0, 3, 4]));
        // Literal values (recorded when the encoding was chosen): XXH3-64 is a frozen spec,
        // so these change only if the encoding does.
        assert_eq!(score(0, 1), 0x20b2_4d3f_4208_d8d1);
        assert_eq!(score(0x0102, 0x0304), 0x1dd1_f263_89fb_ce01);
        assert_eq!(nodes(5).replicas(0), [5, 3, 4]);
        assert_eq!(nodes(5).replicas(1023), [4, 3, 5]);
    }

    #[test]
    fn given_same_members_in_any_order_when_placing_should_get_the_same_placement() {
        let a = Placement::uniform([1, 2, 3, 4, 5, 6, 7], 3).unwrap();
        let b = Placement::uniform([7, 3, 5, 1, 6, 2, 4], 3).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, Placement::uniform(1..=7, 3).unwrap());
        let w = [Member::weighted(1, 2), Member::weighted(2, 1), Member::weighted(3, 5)];
        let rev: Vec<Member> = w.iter().rev().copied().collect();
        assert_eq!(Placement::new(&w, 2).unwrap(), Placement::new(&rev, 2).unwrap());
    }

    #[test]
    fn given_enough_nodes_when_placing_should_give_every_partition_r_distinct_members() {
        for n in [3u64, 4, 10, 50] {
            let placement = nodes(n);
            assert_eq!(placement.effective_replication(), 3);
            for (p, set) in placement.iter() {
                assert_eq!(set.len(), 3, "partition {p}");
                let distinct: HashSet<NodeId> = set.iter().copied().collect();
                assert_eq!(distinct.len(), 3, "partition {p}: {set:?}");
                assert!(set.iter().all(|id| (1..=n).contains(id)));
                assert_eq!(placement.leader(p), set[0]);
            }
            assert_eq!(placement.iter().count(), PARTITION_COUNT);
        }
    }

    #[test]
    fn given_fewer_nodes_than_r_when_placing_should_put_every_partition_on_every_node() {
        for n in [1u64, 2] {
            let placement = nodes(n);
            assert_eq!(placement.replication(), 3);
            assert_eq!(placement.effective_replication(), usize::try_from(n).unwrap());
            for (_, set) in placement.iter() {
                let mut sorted = set.to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, (1..=n).collect::<Vec<_>>());
            }
        }
        // With two nodes the leader still alternates between them.
        let loads = nodes(2).loads();
        assert!(loads.iter().all(|l| l.leaders > 400), "{loads:?}");
    }

    #[test]
    fn given_bad_member_lists_when_placing_should_refuse() {
        assert_eq!(Placement::new(&[], 3), Err(PlacementError::NoMembers));
        assert_eq!(Placement::uniform([1], 0), Err(PlacementError::ZeroReplication));
        assert_eq!(Placement::uniform([4, 2, 4], 3), Err(PlacementError::DuplicateNode(4)));
        assert_eq!(
            Placement::new(&[Member::new(1), Member::weighted(2, 0)], 3),
            Err(PlacementError::ZeroWeight(2))
        );
    }

    #[test]
    fn given_equal_weights_when_ranking_should_agree_with_the_weighted_formula() {
        // The integer path for equal weights and the -w/ln(u) path rank nodes the same way.
        let members: Vec<Member> = (1..=20).map(|id| Member::weighted(id, 3)).collect();
        for p in all_partitions().step_by(7) {
            assert_eq!(top_k(p, &members, 5, false), top_k(p, &members, 5, true), "p {p}");
        }
    }

    #[test]
    fn given_n_nodes_when_one_joins_should_move_about_r_over_n_plus_1_slots_onto_it() {
        for n in [3u64, 4, 5, 10, 20, 50] {
            let before = nodes(n);
            let after = nodes(n + 1);
            let diff = before.diff(&after);
            let ideal = (PARTITION_COUNT * 3) as f64 / (n + 1) as f64;
            let copied = diff.slots_copied() as f64;
            assert!(copied > ideal / 2.0 && copied < ideal * 2.0, "n {n}: {copied} vs {ideal}");
            // Every copy lands on the new node, each changed partition swaps exactly one node,
            // and the relative order of the nodes that stay is untouched.
            assert_eq!(diff.copies_by_node().keys().copied().collect::<Vec<_>>(), vec![n + 1]);
            assert_eq!(diff.slots_dropped(), diff.slots_copied());
            assert_eq!(diff.partitions_changed(), diff.slots_copied());
            for c in &diff.changes {
                assert_eq!(c.added, vec![n + 1]);
                assert_eq!(c.removed.len(), 1);
                let kept: Vec<NodeId> = c.after.iter().copied().filter(|&x| x != n + 1).collect();
                assert_eq!(kept, c.before[..2].to_vec());
                assert_eq!(c.leader_changed(), c.after[0] == n + 1);
                assert!(!c.leader_removed());
            }
            let fraction = diff.fraction_copied();
            let ideal_fraction = 1.0 / (n + 1) as f64;
            assert!(fraction > ideal_fraction / 2.0 && fraction < ideal_fraction * 2.0);
        }
    }

    #[test]
    fn given_fewer_than_r_nodes_when_one_joins_should_copy_every_partition_to_it() {
        let diff = nodes(2).diff(&nodes(3));
        assert_eq!(diff.partitions_changed(), PARTITION_COUNT);
        assert_eq!(diff.slots_copied(), PARTITION_COUNT);
        assert_eq!(diff.slots_dropped(), 0);
        assert_eq!(diff.slots_before, 2 * PARTITION_COUNT);
        assert_eq!(diff.slots_after, 3 * PARTITION_COUNT);
    }

    #[test]
    fn given_n_nodes_when_one_leaves_should_move_only_the_slots_it_held() {
        for n in [4u64, 5, 10, 50] {
            let before = nodes(n);
            for gone in [1, n / 2, n] {
                let after = Placement::uniform((1..=n).filter(|&x| x != gone), 3).unwrap();
                let diff = before.diff(&after);
                let held: Vec<PartitionId> =
                    before.iter().filter(|(_, set)| set.contains(&gone)).map(|(p, _)| p).collect();
                let changed: Vec<PartitionId> = diff.changes.iter().map(|c| c.partition).collect();
                assert_eq!(changed, held, "n {n}, node {gone} leaves");
                assert_eq!(diff.slots_dropped(), held.len());
                assert_eq!(diff.slots_copied(), held.len());
                assert_eq!(diff.drops_by_node().keys().copied().collect::<Vec<_>>(), vec![gone]);
                for c in &diff.changes {
                    assert_eq!(c.removed, vec![gone]);
                    assert_eq!(c.added.len(), 1);
                    assert_eq!(c.leader_changed(), c.before[0] == gone);
                    assert_eq!(c.leader_removed(), c.before[0] == gone);
                    let kept: Vec<NodeId> =
                        c.before.iter().copied().filter(|&x| x != gone).collect();
                    assert_eq!(kept, c.after[..2].to_vec());
                }
            }
        }
    }

    #[test]
    fn given_three_nodes_when_one_leaves_should_shrink_every_set_without_copying() {
        let diff = nodes(3).diff(&Placement::uniform([1, 3], 3).unwrap());
        assert_eq!(diff.partitions_changed(), PARTITION_COUNT);
        assert_eq!(diff.slots_copied(), 0);
        assert_eq!(diff.slots_dropped(), PARTITION_COUNT);
    }

    #[test]
    fn given_3_to_50_nodes_when_placing_should_balance_within_five_binomial_sigmas() {
        // Each node is in a partition's set with probability p = R/N, independently per
        // partition, so its replica count is Binomial(1024, R/N) and its leader count
        // Binomial(1024, 1/N). Every node must lie within 5 standard deviations of those
        // means (plus one for rounding), and none may be empty.
        for n in 3u64..=50 {
            let placement = nodes(n);
            let loads = placement.loads();
            assert_eq!(loads.len(), usize::try_from(n).unwrap());
            let total = PARTITION_COUNT as f64;
            for (count, p) in [
                (loads.iter().map(|l| l.replicas).collect::<Vec<_>>(), 3.0 / n as f64),
                (loads.iter().map(|l| l.leaders).collect::<Vec<_>>(), 1.0 / n as f64),
            ] {
                let mean = total * p;
                let sigma = (total * p * (1.0 - p)).sqrt();
                for c in count {
                    let c = c as f64;
                    assert!((c - mean).abs() <= 5.0 * sigma + 1.0, "n {n}: {c} vs {mean}±{sigma}");
                    assert!(c > 0.0, "n {n}: a node got nothing");
                }
            }
            assert_eq!(loads.iter().map(|l| l.leaders).sum::<usize>(), PARTITION_COUNT);
            assert_eq!(loads.iter().map(|l| l.replicas).sum::<usize>(), 3 * PARTITION_COUNT);
        }
    }

    #[test]
    fn given_3_to_50_nodes_when_placing_should_keep_replica_spread_within_25_percent_cv() {
        // A plain-language bound on the same property: the coefficient of variation of replica
        // slots per node stays under 25 % up to 50 nodes (binomial theory: ~12 % at 50).
        for n in 3u64..=50 {
            let loads = nodes(n).loads();
            let xs: Vec<f64> = loads.iter().map(|l| l.replicas as f64).collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
            assert!(var.sqrt() / mean < 0.25, "n {n}: cv {}", var.sqrt() / mean);
        }
    }

    #[test]
    fn given_weighted_nodes_when_placing_should_give_heavier_nodes_proportionally_more() {
        // Ten nodes of weight 1 and ten of weight 3: the heavy ones carry 3/4 of the weight, so
        // they should lead about 3/4 of the partitions (Binomial(1024, 0.75): sigma ~14, the
        // bound below is ~5 sigma). Each node holds at most one replica of a partition, so
        // with R = 3 their share of replica slots lies between their share of nodes (1/2) and
        // their share of weight (3/4).
        let members: Vec<Member> =
            (1..=20).map(|id| Member::weighted(id, if id > 10 { 3 } else { 1 })).collect();
        let placement = Placement::new(&members, 3).unwrap();
        let loads = placement.loads();
        let heavy_leaders: usize = loads.iter().filter(|l| l.weight == 3).map(|l| l.leaders).sum();
        let share = heavy_leaders as f64 / PARTITION_COUNT as f64;
        assert!((share - 0.75).abs() < 0.07, "heavy nodes lead {share}");
        let heavy_replicas: usize =
            loads.iter().filter(|l| l.weight == 3).map(|l| l.replicas).sum();
        let share = heavy_replicas as f64 / (3 * PARTITION_COUNT) as f64;
        assert!(share > 0.55 && share < 0.75, "heavy nodes hold {share} of replicas");
        // Per node, every heavy node out-leads every light node.
        let min_heavy = loads.iter().filter(|l| l.weight == 3).map(|l| l.leaders).min();
        let max_light = loads.iter().filter(|l| l.weight == 1).map(|l| l.leaders).max();
        assert!(min_heavy > max_light, "{loads:?}");

        // R = 1: one node of weight 2 among eight of weight 1 leads ~2/10 of the partitions.
        let mut members: Vec<Member> = (1..=8).map(Member::new).collect();
        members.push(Member::weighted(9, 2));
        let loads = Placement::new(&members, 1).unwrap().loads();
        let heavy = loads.iter().find(|l| l.node == 9).unwrap().leaders as f64;
        let light =
            loads.iter().filter(|l| l.node != 9).map(|l| l.leaders as f64).sum::<f64>() / 8.0;
        assert!((heavy / PARTITION_COUNT as f64 - 0.2).abs() < 0.065, "heavy leads {heavy}");
        assert!(heavy / light > 1.5 && heavy / light < 2.6, "{heavy} vs {light}");
    }

    #[test]
    fn given_a_node_whose_weight_grows_when_diffing_should_only_move_slots_onto_it() {
        let before: Vec<Member> = (1..=10).map(Member::new).collect();
        let mut after = before.clone();
        after[4].weight = 2;
        let diff = Placement::new(&before, 3).unwrap().diff(&Placement::new(&after, 3).unwrap());
        assert!(!diff.is_empty());
        let gained = diff.copies_by_node();
        assert_eq!(gained.keys().copied().collect::<Vec<_>>(), vec![5]);
        assert!(!diff.drops_by_node().contains_key(&5));
    }

    #[test]
    fn given_identical_placements_when_diffing_should_be_empty() {
        let diff = nodes(10).diff(&nodes(10));
        assert!(diff.is_empty());
        assert_eq!(diff.slots_copied(), 0);
        assert_eq!(diff.leader_changes(), 0);
        assert_eq!(diff.fraction_copied(), 0.0);
    }
}
