//! Anti-entropy: replicas compare their message store with each other's, per conversation,
//! and pull the committed messages they lack.
//!
//! Replication keeps the replicas' stores equal as long as every replica applies every entry it
//! commits; anti-entropy is the check that they are, and the repair when they are not (a store
//! that lost data, a bug). Every `cluster.anti_entropy_interval_ms`, a node:
//!
//! 1. asks each partition leader, in one request per leader, for a **digest** of the partitions
//!    it follows there (a replica, not the leader): the leader's applied log index and each
//!    conversation's newest seq, read from one snapshot of its store;
//! 2. compares a partition only once its own applied index has reached the digest's: it has
//!    then applied every entry the leader had, so a message it lacks is lost, not late;
//! 3. for each conversation whose newest seq here is lower, or which is missing here, pulls the
//!    missing range from the leader (a leader's store holds only committed entries) and writes
//!    those messages with their idempotency records, fsynced.
//!
//! A leader also compares the partitions it leads with each follower's digest, the same way,
//! and pulls what it lacks from that follower: a follower's store, too, holds only committed
//! entries. The leader's owner shard keeps serving meanwhile: it reads messages from the store
//! and never writes a seq it already handed out (its conversation state is not a message row),
//! so the repaired rows are the only writes of those keys.
//!
//! Committed messages never change, so a repair write can never undo a newer write. Mutable
//! rows (conversation, members, receipts) are not compared or repaired, and a gap below a
//! conversation's newest seq is not detected (that would need a scan of every entry).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{Notify, watch};

use super::NodeId;
use super::control::ControlView;
use crate::storage::{Ks, Storage, StoredEntry, WriteBatch, WriteOp, WriterHandle, keys};

/// Peer path: digests of partitions ([`wire::DigestRequest`] → [`wire::Digests`]).
pub const DIGEST_PATH: &str = "/antientropy/digest";

/// Peer path: a range of a conversation's entries ([`wire::RangeRequest`] → [`wire::Range`]).
pub const RANGE_PATH: &str = "/antientropy/range";

/// Most conversations per partition in one digest (the rest are compared in later rounds).
const MAX_HEADS: usize = 10_000;

/// Most bytes of entries in one range reply.
const MAX_RANGE_BYTES: usize = 4 << 20;

pub mod wire {
    //! Anti-entropy messages between nodes (protobuf over HTTP on the peer port).

    /// Where to start in one partition.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Cursor {
        /// The partition.
        #[prost(uint32, tag = "1")]
        pub partition: u32,
        /// Conversations after this id (key order); empty: from the first.
        #[prost(string, tag = "2")]
        pub after: String,
    }

    /// Digests of some partitions.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct DigestRequest {
        /// The partitions.
        #[prost(message, repeated, tag = "1")]
        pub cursors: Vec<Cursor>,
    }

    /// A conversation's newest seq.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Head {
        /// The conversation.
        #[prost(string, tag = "1")]
        pub conversation: String,
        /// Its newest seq.
        #[prost(uint64, tag = "2")]
        pub seq: u64,
    }

    /// One partition's digest, read from one snapshot.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Digest {
        /// The partition.
        #[prost(uint32, tag = "1")]
        pub partition: u32,
        /// The leader's applied log index.
        #[prost(uint64, tag = "2")]
        pub applied: u64,
        /// Conversations after the cursor, in key order.
        #[prost(message, repeated, tag = "3")]
        pub heads: Vec<Head>,
        /// More conversations follow the last one.
        #[prost(bool, tag = "4")]
        pub more: bool,
    }

    /// The digests, in request order.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Digests {
        /// The digests.
        #[prost(message, repeated, tag = "1")]
        pub digests: Vec<Digest>,
    }

    /// Entries `after_seq < seq <= to_seq` of a conversation.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct RangeRequest {
        /// The partition.
        #[prost(uint32, tag = "1")]
        pub partition: u32,
        /// The conversation.
        #[prost(string, tag = "2")]
        pub conversation: String,
        /// Exclusive lower bound.
        #[prost(uint64, tag = "3")]
        pub after_seq: u64,
        /// Inclusive upper bound.
        #[prost(uint64, tag = "4")]
        pub to_seq: u64,
    }

    /// One stored entry.
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Row {
        /// Its seq.
        #[prost(uint64, tag = "1")]
        pub seq: u64,
        /// The encoded `StoredEntry`.
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    /// Entries from the start of a range, ascending (a prefix of it when large).
    #[derive(Clone, PartialEq, Eq, prost::Message)]
    pub struct Range {
        /// The entries.
        #[prost(message, repeated, tag = "1")]
        pub rows: Vec<Row>,
    }
}

fn partition_id(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| usize::from(*p) < super::placement::PARTITION_COUNT)
}

/// Answers a digest request from this node's store. `None` when it does not decode or the
/// store fails.
pub async fn serve_digest(storage: Arc<Storage>, body: &[u8]) -> Option<Vec<u8>> {
    let request = wire::DigestRequest::decode(body).ok()?;
    let digests = tokio::task::spawn_blocking(move || {
        let reader = storage.reader();
        let mut digests = Vec::with_capacity(request.cursors.len());
        for c in request.cursors.into_iter().take(super::placement::PARTITION_COUNT) {
            let p = partition_id(c.partition)?;
            let applied = reader.applied_index(p).ok()?;
            let mut heads = reader.heads(p, &c.after, MAX_HEADS + 1).ok()?;
            let more = heads.len() > MAX_HEADS;
            heads.truncate(MAX_HEADS);
            let heads =
                heads.into_iter().map(|(conversation, seq)| wire::Head { conversation, seq });
            digests.push(wire::Digest {
                partition: c.partition,
                applied,
                heads: heads.collect(),
                more,
            });
        }
        Some(digests)
    })
    .await
    .ok()??;
    Some(wire::Digests { digests }.encode_to_vec())
}

/// Answers a range request from this node's store.
pub async fn serve_range(storage: Arc<Storage>, body: &[u8]) -> Option<Vec<u8>> {
    let r = wire::RangeRequest::decode(body).ok()?;
    let p = partition_id(r.partition)?;
    switchboard_protocol::validate::conversation_id(&r.conversation).ok()?;
    let rows = tokio::task::spawn_blocking(move || {
        storage.reader().raw_entries(p, &r.conversation, r.after_seq, r.to_seq, MAX_RANGE_BYTES)
    })
    .await
    .ok()?
    .ok()?;
    let rows = rows.into_iter().map(|(seq, value)| wire::Row { seq, value }).collect();
    Some(wire::Range { rows }.encode_to_vec())
}

/// What a round found in one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Every conversation's newest seq here is at least the leader's.
    Equal,
    /// Some were behind and were repaired.
    Repaired,
    /// This node has not applied everything the digest covers yet: nothing to conclude.
    Behind,
    /// The peer did not answer, or a repair failed.
    Failed,
}

impl Check {
    fn label(self) -> &'static str {
        match self {
            Self::Equal => "equal",
            Self::Repaired => "repaired",
            Self::Behind => "behind",
            Self::Failed => "failed",
        }
    }
}

/// The anti-entropy task of one node.
pub struct AntiEntropy {
    /// This node.
    pub me: NodeId,
    /// The message store.
    pub storage: Arc<Storage>,
    /// Its writer (repairs).
    pub writer: WriterHandle,
    /// The partition table and the peer addresses.
    pub control: watch::Receiver<Arc<ControlView>>,
    /// HTTP client for peers.
    pub client: reqwest::Client,
    /// Time between rounds.
    pub interval: Duration,
}

impl AntiEntropy {
    /// Runs rounds until `stop`.
    pub async fn run(self, stop: Arc<Notify>) {
        let mut cursors: HashMap<(u16, NodeId), String> = HashMap::new();
        loop {
            tokio::select! {
                () = stop.notified() => return,
                () = tokio::time::sleep(self.interval) => {}
            }
            self.round(&mut cursors).await;
        }
    }

    /// One round, one digest request per peer: every partition this node follows, compared
    /// with its leader, and every partition it leads, compared with each follower; what this
    /// node lacks is pulled from that peer.
    async fn round(&self, cursors: &mut HashMap<(u16, NodeId), String>) {
        let view = self.control.borrow().clone();
        let mut by_peer: HashMap<NodeId, Vec<u16>> = HashMap::new();
        for (p, a) in view.machine.table.partitions.iter().enumerate() {
            let Ok(p) = u16::try_from(p) else { continue };
            if a.leader == self.me {
                for r in a.replicas.iter().filter(|r| **r != self.me) {
                    by_peer.entry(*r).or_default().push(p);
                }
            } else if a.replicas.contains(&self.me) {
                by_peer.entry(a.leader).or_default().push(p);
            }
        }
        for (peer, partitions) in by_peer {
            let addr = view.machine.membership.membership().get_node(&peer).map(|n| n.addr.clone());
            let Some(addr) = addr else { continue };
            let cursors_out = partitions
                .iter()
                .map(|p| wire::Cursor {
                    partition: u32::from(*p),
                    after: cursors.get(&(*p, peer)).cloned().unwrap_or_default(),
                })
                .collect();
            let body = wire::DigestRequest { cursors: cursors_out }.encode_to_vec();
            let digests = super::raft::post_protobuf(
                &self.client,
                &addr,
                DIGEST_PATH,
                body,
                Duration::from_secs(10),
            )
            .await
            .and_then(|b| wire::Digests::decode(b).ok());
            let Some(digests) = digests else {
                let n = partitions.len() as u64;
                metrics::counter!(crate::metrics::ANTI_ENTROPY_CHECKS, "outcome" => Check::Failed.label())
                    .increment(n);
                continue;
            };
            let digests: Vec<(u16, wire::Digest)> = digests
                .digests
                .into_iter()
                .filter_map(|d| Some((partition_id(d.partition)?, d)))
                .collect();
            for (p, d) in &digests {
                match (d.more, d.heads.last()) {
                    (true, Some(last)) => cursors.insert((*p, peer), last.conversation.clone()),
                    _ => cursors.remove(&(*p, peer)),
                };
            }
            let local = self.local_heads(&digests).await;
            for ((p, d), local) in digests.iter().zip(local) {
                let check = match local {
                    Some(local) => self.check(*p, d, local, &addr).await,
                    None => Check::Failed,
                };
                metrics::counter!(crate::metrics::ANTI_ENTROPY_CHECKS, "outcome" => check.label())
                    .increment(1);
            }
        }
    }

    /// This node's applied index and its newest seq of each conversation of each digest (0
    /// when absent), read from one snapshot on one blocking thread; `None` for a partition
    /// whose read failed.
    async fn local_heads(&self, digests: &[(u16, wire::Digest)]) -> Vec<Option<(u64, Vec<u64>)>> {
        let storage = self.storage.clone();
        let wanted: Vec<(u16, Vec<String>)> = digests
            .iter()
            .map(|(p, d)| (*p, d.heads.iter().map(|h| h.conversation.clone()).collect()))
            .collect();
        let n = wanted.len();
        let read = tokio::task::spawn_blocking(move || {
            let reader = storage.reader();
            let one = |p: u16, names: Vec<String>| {
                let applied = reader.applied_index(p)?;
                let mut heads = Vec::with_capacity(names.len());
                for c in names {
                    heads.push(reader.head(p, &c)?.map_or(0, |(seq, _)| seq));
                }
                Ok::<_, crate::storage::StorageError>((applied, heads))
            };
            wanted.into_iter().map(|(p, names)| one(p, names).ok()).collect()
        })
        .await;
        read.unwrap_or_else(|_| vec![None; n])
    }

    /// Compares one partition with a peer's digest, given this node's `(applied, heads)` for
    /// it, and repairs what is missing here from that peer.
    async fn check(
        &self,
        p: u16,
        digest: &wire::Digest,
        (applied, heads): (u64, Vec<u64>),
        addr: &str,
    ) -> Check {
        if applied < digest.applied {
            return Check::Behind;
        }
        let mut check = Check::Equal;
        for (h, mine) in digest.heads.iter().zip(heads) {
            if mine >= h.seq {
                continue;
            }
            tracing::warn!(
                partition = p,
                conversation = %h.conversation,
                here = mine,
                peer = h.seq,
                "anti-entropy: this replica lacks committed messages; pulling them"
            );
            match self.repair(p, &h.conversation, mine, h.seq, addr).await {
                Some(n) => {
                    metrics::counter!(crate::metrics::ANTI_ENTROPY_REPAIRED).increment(n);
                    check = Check::Repaired;
                }
                None => return Check::Failed,
            }
        }
        check
    }

    /// Pulls entries `after < seq <= to` of a conversation from a peer and writes them
    /// (fsynced); the number written, `None` on failure.
    async fn repair(
        &self,
        p: u16,
        conversation: &str,
        after: u64,
        to: u64,
        addr: &str,
    ) -> Option<u64> {
        let mut next = after;
        let mut written = 0;
        while next < to {
            let body = wire::RangeRequest {
                partition: u32::from(p),
                conversation: conversation.to_owned(),
                after_seq: next,
                to_seq: to,
            }
            .encode_to_vec();
            let range = super::raft::post_protobuf(
                &self.client,
                addr,
                RANGE_PATH,
                body,
                Duration::from_secs(10),
            )
            .await
            .and_then(|b| wire::Range::decode(b).ok())?;
            if range.rows.is_empty() {
                return None;
            }
            let mut ops = Vec::with_capacity(range.rows.len() * 2);
            for row in range.rows {
                if row.seq <= next || row.seq > to {
                    return None;
                }
                next = row.seq;
                ops.extend(repair_ops(p, conversation, row)?);
                written += 1;
            }
            self.write(ops).await?;
        }
        Some(written)
    }

    /// Writes `ops` in one fsynced batch and waits for it.
    async fn write(&self, ops: Vec<WriteOp>) -> Option<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let sink: crate::storage::CommitSink = Arc::new(move |c| {
            if let Some(tx) = tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                let _ = tx.send(c.result.is_ok());
            }
        });
        self.writer.submit(WriteBatch { token: 0, ops, sink, fsync: true }).ok()?;
        rx.await.ok()?.then_some(())
    }
}

/// The writes that restore one entry: the entry itself and, for a user's message, its
/// idempotency record. `None` when the row does not hold an entry of this conversation and seq.
fn repair_ops(p: u16, conversation: &str, row: wire::Row) -> Option<Vec<WriteOp>> {
    let entry = StoredEntry::decode(row.value.as_slice()).ok()?;
    let msg = switchboard_protocol::Message::decode(entry.message.clone()).ok()?;
    if msg.seq != row.seq || msg.conversation_id != conversation {
        return None;
    }
    let mut ops =
        vec![WriteOp::Put(Ks::Messages, keys::message_key(p, conversation, row.seq), row.value)];
    if msg.system.is_none() && !msg.client_msg_id.is_empty() {
        ops.push(WriteOp::Put(
            Ks::Dedupe,
            keys::dedupe_key(conversation, &msg.sender, &msg.client_msg_id),
            crate::storage::encode_dedupe(msg.seq, msg.timestamp_ms),
        ));
    }
    Some(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: u64, conversation: &str, client_msg_id: &str) -> wire::Row {
        let msg = switchboard_protocol::Message {
            conversation_id: conversation.into(),
            seq,
            sender: "alice".into(),
            timestamp_ms: 1000 + seq,
            client_msg_id: client_msg_id.into(),
            ..Default::default()
        };
        let entry = StoredEntry { epoch: 2, ordinal: seq, message: msg.encode_to_vec().into() };
        wire::Row { seq, value: entry.encode_to_vec() }
    }

    #[test]
    fn given_a_user_message_should_restore_it_with_its_idempotency_record() {
        let ops = repair_ops(7, "g:x", row(3, "g:x", "k3")).expect("valid");
        assert_eq!(ops.len(), 2);
        assert!(
            matches!(&ops[0], WriteOp::Put(Ks::Messages, k, _) if *k == keys::message_key(7, "g:x", 3))
        );
        assert!(matches!(&ops[1], WriteOp::Put(Ks::Dedupe, k, v)
            if *k == keys::dedupe_key("g:x", "alice", "k3") && *v == crate::storage::encode_dedupe(3, 1003)));
    }

    #[test]
    fn given_a_row_of_another_seq_or_conversation_should_refuse_it() {
        let mut r = row(3, "g:x", "k3");
        r.seq = 4;
        assert!(repair_ops(7, "g:x", r).is_none());
        assert!(repair_ops(7, "g:y", row(3, "g:x", "k3")).is_none());
        assert!(repair_ops(7, "g:x", wire::Row { seq: 3, value: vec![0xff, 0xff] }).is_none());
    }
}
