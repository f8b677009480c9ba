//! Where the shards meet the replication engine: client writes become replicated entries.
//!
//! - A partition owner that accepts a write checks [`Partitions::serving`]: only a node whose
//!   engine serves the partition's current epoch (its marker committed and everything before
//!   it applied locally) accepts writes; others answer `NOT_LEADER` with the leader's address.
//! - The owner's batch share of one partition becomes one [`Proposal`]; the engine appends it
//!   to the partition's log and replicates it.
//! - Once an entry is committed, **every** replica applies it to its own store through its
//!   storage writer (in log order, with the applied index in the same atomic batch). On the
//!   leader, the writer then reports [`Outcome::Applied`] to the owner shard, which runs the
//!   batch's effects (acks, deliveries): nothing is acknowledged before a majority fsynced it.
//! - An entry that may never commit (the leader stepped down) is reported
//!   [`Outcome::Failed`]; the client retries with its idempotency key, and whichever node leads
//!   next answers from its own replicated dedupe records.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::NodeId;
use super::placement::PARTITION_COUNT;
use super::replica::Epoch;
use crate::shard::ShardMsg;
use crate::storage::{Storage, WriterHandle};

/// Proposals waiting for the engine; beyond this the shard fails the batch (`UNAVAILABLE`).
const PROPOSALS: usize = 4096;

/// What every shard can read about each partition, published by the engine.
#[derive(Debug)]
pub struct Partitions {
    /// The epoch this node serves writes in, per partition; 0: it does not.
    serving: Vec<AtomicU64>,
    /// The leader the committed table names, per partition; 0: none yet.
    leader: Vec<AtomicU64>,
}

impl Default for Partitions {
    fn default() -> Self {
        Self {
            serving: (0..PARTITION_COUNT).map(|_| AtomicU64::new(0)).collect(),
            leader: (0..PARTITION_COUNT).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Partitions {
    /// The epoch in which this node accepts writes for `partition`, if it does.
    #[must_use]
    pub fn serving(&self, partition: u16) -> Option<Epoch> {
        let e = self.serving.get(usize::from(partition))?.load(Ordering::Acquire);
        (e != 0).then_some(e)
    }

    /// The partition's leader per the committed table.
    #[must_use]
    pub fn leader(&self, partition: u16) -> Option<NodeId> {
        let n = self.leader.get(usize::from(partition))?.load(Ordering::Acquire);
        (n != 0).then_some(n)
    }

    pub(super) fn set_serving(&self, partition: u16, epoch: Option<Epoch>) {
        if let Some(a) = self.serving.get(usize::from(partition)) {
            a.store(epoch.unwrap_or(0), Ordering::Release);
        }
    }

    pub(super) fn set_leader(&self, partition: u16, leader: NodeId) {
        if let Some(a) = self.leader.get(usize::from(partition)) {
            a.store(leader, Ordering::Release);
        }
    }
}

/// One partition's share of an owner batch, to replicate.
#[derive(Debug)]
pub struct Proposal {
    /// The partition.
    pub partition: u16,
    /// The epoch the owner accepted the writes in; another epoch fails the proposal.
    pub epoch: Epoch,
    /// The encoded writes ([`crate::storage::encode_ops`]).
    pub payload: Bytes,
    /// The owner shard, and its token for the batch.
    pub shard: usize,
    /// The owner's token.
    pub token: u64,
}

/// What became of a proposal, reported to its owner shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed by a majority and applied to this node's store; the `user_seq` of each feed
    /// append, in order.
    Applied(Vec<u64>),
    /// Not accepted, or accepted by a leader that stepped down before it committed: it may
    /// still commit later under another leader, so clients retry with the same idempotency key.
    Failed,
}

/// Hands proposals to the engine. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct Proposer(mpsc::Sender<Proposal>);

impl Proposer {
    /// Queues a proposal.
    ///
    /// # Errors
    /// Gives it back when the engine's queue is full or the engine is gone.
    pub fn propose(&self, p: Proposal) -> Result<(), Proposal> {
        self.0.try_send(p).map_err(|e| match e {
            mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
        })
    }
}

/// The proposal queue: the shards' end and the engine's.
#[must_use]
pub fn proposals() -> (Proposer, mpsc::Receiver<Proposal>) {
    let (tx, rx) = mpsc::channel(PROPOSALS);
    (Proposer(tx), rx)
}

/// What the engine needs to apply committed entries and report to the shards.
#[derive(Clone)]
pub struct DataPlane {
    /// The message store (for the applied indexes at start).
    pub storage: Arc<Storage>,
    /// Its writer, through which committed entries are applied.
    pub writer: WriterHandle,
    /// Every shard's mailbox, for outcomes.
    pub shards: Vec<mpsc::Sender<ShardMsg>>,
    /// Published per-partition state.
    pub partitions: Arc<Partitions>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl DataPlane {
    /// Reports an outcome to a shard from the engine's task (never blocks the engine loop:
    /// a full mailbox gets it from a task).
    pub(super) fn report(&self, shard: usize, token: u64, outcome: Outcome) {
        let Some(tx) = self.shards.get(shard) else { return };
        if let Err(mpsc::error::TrySendError::Full(msg)) =
            tx.try_send(ShardMsg::Replicated { token, outcome })
        {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }
}
