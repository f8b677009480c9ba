//! Scale-out.
//!
//! - [`membership`]: gossip membership and failure detection (chitchat), with a persisted
//!   generation per start; wired into the broker when `cluster.listen` is set.
//! - [`control`]: the partition table (epoch, leader, replica set per partition) as the state
//!   machine of a Raft group ([`raft`]: openraft with its log in fjall), with bootstrap, joins,
//!   placement and failover planned by the Raft leader.
//! - [`replication`]: the data plane's engine: a [`replica::Replica`] per partition held,
//!   appointed by the table, with promises and logs in fjall and one fsync per round.
//! - [`replica`]: replication of one partition's log, epoch-fenced primary-backup, as a
//!   sans-I/O state machine; `sim` (tests) drives it through a deterministic simulator with
//!   message loss, delay, reordering, duplication, partitions, crashes and epoch changes.
//! - [`placement`]: which nodes replicate each partition (rendezvous hashing), and what a
//!   membership change moves.
//!
//! - [`dataplane`]: where shards meet the engine: owners' writes become replicated entries,
//!   applied on every replica once committed, acknowledged on the leader after that.
//! - [`antientropy`]: followers compare their message store with the leaders' per
//!   conversation and pull committed messages they lack.
//! - [`presence`]: presence across nodes, decided on each user's home node from every node's
//!   reports.
//!
//! Requests for a partition led elsewhere are forwarded to its leader, and every replica
//! delivers what it applies to its own sessions (`shard::forward`, `docs/cluster.md`). Not
//! built yet: reads on nodes outside a partition's replica set, log compaction and
//! anti-entropy (see "Limits" in `docs/cluster.md`).

/// A node of the cluster.
pub type NodeId = u64;

pub mod antientropy;
pub mod control;
pub mod dataplane;
pub mod membership;
pub mod placement;
pub mod presence;
pub mod raft;
pub mod replica;
pub mod replication;

#[cfg(test)]
mod sim;
