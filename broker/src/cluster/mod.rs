//! Scale-out.
//!
//! - [`membership`]: gossip membership and failure detection (chitchat), with a persisted
//!   generation per start; wired into the broker when `cluster.listen` is set.
//! - [`replica`]: replication of one partition's log, epoch-fenced primary-backup, as a
//!   sans-I/O state machine; `sim` (tests) drives it through a deterministic simulator with
//!   message loss, delay, reordering, duplication, partitions, crashes and epoch changes.
//! - [`placement`]: which nodes replicate each partition (rendezvous hashing), and what a
//!   membership change moves.
//!
//! Not wired into the broker yet: the Raft control plane that allocates epochs, the peer
//! transport, replication of conversation logs and routing come next (see `docs/cluster.md`).

/// A node of the cluster.
pub type NodeId = u64;

pub mod membership;
pub mod placement;
pub mod replica;

#[cfg(test)]
mod sim;
