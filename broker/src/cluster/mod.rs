//! Scale-out: the pieces of the cluster that are independent of the network.
//!
//! - [`replica`]: replication of one partition's log, epoch-fenced primary-backup, as a
//!   sans-I/O state machine; `sim` (tests) drives it through a deterministic simulator with
//!   message loss, delay, reordering, duplication, partitions, crashes and epoch changes.
//! - [`placement`]: which nodes replicate each partition (rendezvous hashing), and what a
//!   membership change moves.
//!
//! Not wired into the broker yet: gossip membership, the Raft control plane that allocates
//! epochs, the transport and routing come next (see `docs/cluster.md`).

/// A node of the cluster.
pub type NodeId = u64;

pub mod placement;
pub mod replica;

#[cfg(test)]
mod sim;
