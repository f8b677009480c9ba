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
//! - Committed entries a node applies without having proposed them ([`Replayed`]) are
//!   delivered by its owner shard to the local sessions that follow their conversations.
//! - A request that reaches a node which does not lead its conversation is forwarded to the
//!   leader over the peer port ([`FORWARD_PATH`], batches in order per target node); the
//!   leader answers as if the session were local, and the reply is relayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::NodeId;
use super::placement::PARTITION_COUNT;
use super::replica::Epoch;
use crate::shard::ShardMsg;
use crate::storage::{Ks, Storage, WriteOp, WriterHandle};

/// Proposals waiting for the engine; beyond this the shard fails the batch (`UNAVAILABLE`).
const PROPOSALS: usize = 4096;

/// Peer path that receives forwarded client requests.
pub const FORWARD_PATH: &str = "/forward";

/// Peer path that receives pushes for local sessions (typing, receipts) from a leader.
pub const DELIVER_PATH: &str = "/deliver";

/// How long a forwarded request may take before the session gets `UNAVAILABLE`.
pub const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub mod wire {
    //! Forwarded requests between nodes (protobuf over HTTP on the peer port).

    use bytes::Bytes;

    /// One client request, on behalf of an authenticated user.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Forward {
        /// The user the session authenticated as (the peer port is trusted).
        #[prost(string, tag = "1")]
        pub user: String,
        /// The conversation, resolved (a create's generated or derived id).
        #[prost(string, tag = "2")]
        pub conversation_id: String,
        /// The encoded `ClientFrame` (request id and request).
        #[prost(bytes = "bytes", tag = "3")]
        pub frame: Bytes,
    }

    /// Requests in the order the sending node received them.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ForwardBatch {
        /// The requests.
        #[prost(message, repeated, tag = "1")]
        pub requests: Vec<Forward>,
    }

    /// A push for the sessions that follow a conversation on the receiving node.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Push {
        /// The conversation.
        #[prost(string, tag = "1")]
        pub conversation_id: String,
        /// The encoded `ServerFrame`.
        #[prost(bytes = "bytes", tag = "2")]
        pub frame: Bytes,
        /// Dropped for slow sessions instead of queued (typing).
        #[prost(bool, tag = "3")]
        pub droppable: bool,
    }

    /// Pushes from one node.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PushBatch {
        /// The pushes.
        #[prost(message, repeated, tag = "1")]
        pub pushes: Vec<Push>,
    }

    /// One encoded `ServerFrame` per request, in the same order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ForwardReplies {
        /// The replies.
        #[prost(bytes = "bytes", repeated, tag = "1")]
        pub replies: Vec<Bytes>,
    }
}

/// Handles a forwarded batch on the leader: each request goes to its conversation's owner
/// shard (in order), and the replies come back in order; a request that cannot be decoded, or
/// gets no answer in time, is answered with an error.
pub async fn serve_forwarded(shards: &[mpsc::Sender<ShardMsg>], body: &[u8]) -> Option<Vec<u8>> {
    use prost::Message as _;
    use switchboard_protocol::{ClientFrame, Encoded, ErrorCode};
    let batch = wire::ForwardBatch::decode(body).ok()?;
    let mut waiting = Vec::with_capacity(batch.requests.len());
    for f in batch.requests {
        let decoded = ClientFrame::decode(f.frame).ok().and_then(|frame| {
            let op = crate::shard::mailbox::Remote::from_kind(frame.kind?, &f.conversation_id)?;
            Some((frame.request_id, op))
        });
        let Some((request_id, op)) = decoded else {
            waiting.push(Err(0));
            continue;
        };
        let owner =
            crate::shard::owner_shard(crate::shard::partition(&f.conversation_id), shards.len());
        let (reply, rx) = tokio::sync::oneshot::channel();
        let request = crate::shard::mailbox::Forward {
            from: crate::shard::SessionRef { shard: owner, id: 0 },
            user: Arc::from(f.user.as_str()),
            request_id,
            op,
        };
        match shards.get(owner) {
            Some(tx) if tx.send(ShardMsg::Forwarded { request, reply }).await.is_ok() => {
                waiting.push(Ok((request_id, rx)));
            }
            // The shard is gone (stopping): the dropped reply reads as unavailable below.
            _ => waiting.push(Ok((request_id, rx))),
        }
    }
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    let mut replies = Vec::with_capacity(waiting.len());
    for w in waiting {
        let frame = match w {
            Ok((request_id, rx)) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(frame)) => frame,
                _ => Encoded::of(&crate::shard::error_frame(
                    request_id,
                    ErrorCode::Unavailable,
                    "the leader did not answer in time",
                )),
            },
            Err(request_id) => Encoded::of(&crate::shard::error_frame(
                request_id,
                ErrorCode::BadRequest,
                "malformed forwarded request",
            )),
        };
        replies.push(frame.payload());
    }
    Some(wire::ForwardReplies { replies }.encode_to_vec())
}

/// Hands pushes from another node to the owner shards of their conversations (best effort: a
/// full mailbox drops them). `false` when the batch does not decode.
pub fn serve_pushes(shards: &[mpsc::Sender<ShardMsg>], body: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(batch) = wire::PushBatch::decode(body) else { return false };
    for p in batch.pushes {
        let Ok(frame) = switchboard_protocol::ServerFrame::decode(p.frame) else { return false };
        let owner =
            crate::shard::owner_shard(crate::shard::partition(&p.conversation_id), shards.len());
        let msg = crate::shard::OwnerMsg::Deliver {
            conversation: Arc::from(p.conversation_id.as_str()),
            frame: switchboard_protocol::Encoded::of(&frame),
            droppable: p.droppable,
        };
        if let Some(tx) = shards.get(owner) {
            let _ = tx.try_send(ShardMsg::Owner(msg));
        }
    }
    true
}

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

    pub(crate) fn set_serving(&self, partition: u16, epoch: Option<Epoch>) {
        if let Some(a) = self.serving.get(usize::from(partition)) {
            a.store(epoch.unwrap_or(0), Ordering::Release);
        }
    }

    pub(crate) fn set_leader(&self, partition: u16, leader: NodeId) {
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
    /// The encoded writes ([`crate::storage::encode_ops`]), replicated.
    pub payload: Bytes,
    /// The same writes, applied on this node once committed (no decoding of its own entries).
    pub ops: Vec<WriteOp>,
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

/// Committed entries this node applied but did not propose in the current epoch (it follows,
/// or adopted them): what its owner shard delivers to local sessions.
#[derive(Debug, Default, Clone)]
pub struct Replayed {
    /// The `messages` values written (encoded `StoredEntry`), in log order.
    pub messages: Vec<Bytes>,
    /// The feed events appended, with the `user_seq` this node assigned.
    pub feeds: Vec<(Arc<str>, switchboard_protocol::FeedEvent)>,
}

impl Replayed {
    /// What an entry's writes deliver.
    #[must_use]
    pub fn of(ops: &[WriteOp]) -> Self {
        let mut r = Self::default();
        for op in ops {
            match op {
                WriteOp::Put(Ks::Messages, _, value) => {
                    r.messages.push(Bytes::copy_from_slice(value));
                }
                WriteOp::FeedAppend { user, event } => r.feeds.push((user.clone(), event.clone())),
                _ => {}
            }
        }
        r
    }

    /// Nothing to deliver.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.feeds.is_empty()
    }
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
