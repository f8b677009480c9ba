//! Requests for conversations another node leads (cluster): forwarded to the leader over the
//! peer port, in order per target node (one batch in flight per target and shard, so a
//! session's requests keep their order), and the replies relayed to the sessions here.
//!
//! Also the other way: pushes a leader makes that are not log entries (typing, receipts) go to
//! the other nodes replicating the conversation, for their sessions (best effort: a full queue
//! or an unreachable node drops them, like a slow session drops typing).

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;
use switchboard_protocol::{ClientFrame, Encoded, ErrorCode, ServerFrame, SharedFrame};
use tokio::sync::mpsc;

use super::Shard;
use super::mailbox::{Forward, Outgoing};
use crate::cluster::NodeId;
use crate::cluster::dataplane::{DELIVER_PATH, FORWARD_PATH, FORWARD_TIMEOUT, wire};

/// Most requests in one forwarded batch.
const MAX_BATCH: usize = 256;

impl Shard {
    /// Queues a request for the node that leads its conversation.
    pub(crate) fn forward(self: &Rc<Self>, to: NodeId, f: Forward) {
        let mut queues = self.forwards.borrow_mut();
        let tx = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::task::spawn_local(forward_loop(self.clone(), to, rx));
            tx
        });
        if let Err(mpsc::error::SendError(f)) = tx.send(f) {
            let mut out = Outgoing::new(self.count);
            out.to_session(f.from, unavailable(f.request_id), true);
            self.dispatch(out);
        }
    }

    /// Sends a push to the other nodes replicating `conversation`'s partition.
    pub(crate) fn push_to_peers(
        self: &Rc<Self>,
        conversation: &Arc<str>,
        frame: &SharedFrame,
        droppable: bool,
    ) {
        let Some(cluster) = &self.cluster else { return };
        let me = cluster.gossip.borrow().self_id;
        let replicas: Vec<NodeId> = {
            let control = cluster.control.borrow();
            let p = usize::from(super::partition(conversation));
            control.machine.table.partitions.get(p).map(|a| a.replicas.clone()).unwrap_or_default()
        };
        let mut queues = self.pushes.borrow_mut();
        for node in replicas.into_iter().filter(|n| *n != me) {
            let tx = queues.entry(node).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PUSH_QUEUE);
                tokio::task::spawn_local(push_loop(self.clone(), node, rx));
                tx
            });
            let push = Push { conversation: conversation.clone(), frame: frame.clone(), droppable };
            let _ = tx.try_send(push);
        }
    }

    /// The peer-port address of node `id`, per the control plane's membership.
    fn peer_addr(&self, id: NodeId) -> Option<String> {
        let control = self.cluster.as_ref()?.control.borrow().clone();
        control.machine.membership.membership().get_node(&id).map(|n| n.addr.clone())
    }
}

/// Pushes waiting for one node; beyond this they are dropped.
const PUSH_QUEUE: usize = 4096;

/// A push for another node's sessions.
#[derive(Debug)]
pub(crate) struct Push {
    conversation: Arc<str>,
    frame: SharedFrame,
    droppable: bool,
}

async fn push_loop(shard: Rc<Shard>, to: NodeId, mut rx: mpsc::Receiver<Push>) {
    let Ok(client) = peer_client(&shard) else { return };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Some(addr) = shard.peer_addr(to) else { continue };
        let pushes = batch
            .into_iter()
            .map(|p| wire::Push {
                conversation_id: p.conversation.to_string(),
                frame: p.frame.payload(),
                droppable: p.droppable,
            })
            .collect();
        let body = wire::PushBatch { pushes }.encode_to_vec();
        let sent = client
            .post(format!("http://{addr}{DELIVER_PATH}"))
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .timeout(std::time::Duration::from_secs(2))
            .send()
            .await;
        if let Err(e) = sent {
            tracing::debug!(peer = addr, error = %e, "pushes to a peer dropped");
        }
    }
}

fn peer_client(shard: &Shard) -> Result<reqwest::Client, ()> {
    let bind = shard.cluster.as_ref().map(|c| c.routing.bind);
    crate::cluster::raft::peer_client(bind)
        .map_err(|e| tracing::error!(error = %e, "cannot build a peer client"))
}

fn unavailable(request_id: u64) -> SharedFrame {
    Encoded::of(&super::error_frame(
        request_id,
        ErrorCode::Unavailable,
        "the conversation's leader could not be reached; retry",
    ))
}

async fn forward_loop(shard: Rc<Shard>, to: NodeId, mut rx: mpsc::UnboundedReceiver<Forward>) {
    let Ok(client) = peer_client(&shard) else { return };
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let mut requests = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for f in batch {
            let (kind, conversation_id) = f.op.into_kind();
            let frame = ClientFrame::request(f.request_id, kind).encode_to_vec();
            requests.push(wire::Forward {
                user: f.user.to_string(),
                conversation_id,
                frame: Bytes::from(frame),
            });
            waiting.push((f.from, f.request_id));
        }
        let replies = match shard.peer_addr(to) {
            Some(addr) => post(&client, &addr, wire::ForwardBatch { requests }).await,
            None => None,
        };
        let mut out = Outgoing::new(shard.count);
        let mut replies = replies.filter(|r| r.len() == waiting.len()).map(Vec::into_iter);
        let outcome = if replies.is_some() { "ok" } else { "unavailable" };
        metrics::counter!(crate::metrics::FORWARDED, "outcome" => outcome)
            .increment(waiting.len() as u64);
        for (from, request_id) in waiting {
            let frame = replies
                .as_mut()
                .and_then(Iterator::next)
                .and_then(|r| ServerFrame::decode(r).ok())
                .filter(|f| f.request_id == request_id)
                .map_or_else(|| unavailable(request_id), |f| Encoded::of(&f));
            out.to_session(from, frame, true);
        }
        shard.dispatch(out);
    }
}

async fn post(
    client: &reqwest::Client,
    addr: &str,
    batch: wire::ForwardBatch,
) -> Option<Vec<Bytes>> {
    let response = client
        .post(format!("http://{addr}{FORWARD_PATH}"))
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(batch.encode_to_vec())
        .timeout(FORWARD_TIMEOUT + std::time::Duration::from_secs(1))
        .send()
        .await
        .map_err(|e| tracing::debug!(peer = addr, error = %e, "forwarding failed"))
        .ok()?;
    if !response.status().is_success() {
        tracing::debug!(peer = addr, status = %response.status(), "forwarding refused");
        return None;
    }
    let body = response.bytes().await.ok()?;
    wire::ForwardReplies::decode(body).ok().map(|r| r.replies)
}
