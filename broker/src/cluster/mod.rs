//! Scale-out.
//!
//! - [`membership`]: gossip membership and failure detection (chitchat), with a persisted
//!   generation per start; wired into the broker when `cluster.listen` is set.
//! - [`control`]: the partition table (epoch, leader, replica set per partition) as the state
//!   machine of a Raft group ([`raft`]: openraft with its log in fjall), with bootstrap, joins,
//!   placement and failover planned by the Raft leader.
//! - [`replica`]: replication of one partition's log, epoch-fenced primary-backup, as a
//!   sans-I/O state machine; `sim` (tests) drives it through a deterministic simulator with
//!   message loss, delay, reordering, duplication, partitions, crashes and epoch changes.
//! - [`placement`]: which nodes replicate each partition (rendezvous hashing), and what a
//!   membership change moves.
//!
//! Not wired into the broker yet: replication of conversation logs over the network, routing
//! and anti-entropy come next (see `docs/cluster.md`).

/// A node of the cluster.
pub type NodeId = u64;

pub mod control;
pub mod membership;
pub mod placement;
pub mod raft;
pub mod replica;

#[cfg(test)]
mod sim;
