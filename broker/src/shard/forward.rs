//! Requests for conversations another node leads (cluster): forwarded to the leader over the
//! peer port, in order per target node (one batch in flight per target and shard, so a
//! session's requests keep their order), and the replies relayed to the sessions here.
//!
//! Also the other way: pushes a leader makes that are not log entries (typing, receipts) go to
//! the other nodes replicating the conversation, for their sessions (best effort: a full queue
//! or an unreachable node drops them, like a slow session drops typing).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use switchboard_protocol::{ClientFrame, Encoded, ErrorCode, ServerFrame, SharedFrame};
use tokio::sync::mpsc;

use super::Shard;
use super::mailbox::{Forward, Outgoing};
use crate::cluster::dataplane::{DELIVER_PATH, FORWARD_PATH, FORWARD_TIMEOUT, wire};
use crate::cluster::raft::post_protobuf;
use crate::cluster::{NodeId, presence};

/// Most requests or pushes in one batch to a peer.
const MAX_BATCH: usize = 256;

/// Requests or pushes waiting for one node; beyond this, requests are answered `UNAVAILABLE`
/// and pushes dropped.
const QUEUE: usize = 4096;

/// The first item and whatever else is queued behind it, up to [`MAX_BATCH`]; `None` once the
/// queue is closed.
async fn next_batch<T>(rx: &mut mpsc::Receiver<T>) -> Option<Vec<T>> {
    let mut batch = vec![rx.recv().await?];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Decides where reads of a partition are served. A copy is *complete* on the members of its
/// replica set, and during a move on the members of the previous set (the new epoch's leader
/// keeps them current until the move settles), not on a move's newcomers (still being
/// filled). A node reads its own copy when it serves the partition as leader or holds a
/// complete copy; other reads go to the leader when its copy is complete and gossip sees it
/// live, else to another live holder of a complete copy.
pub(crate) struct Locator<'a> {
    me: NodeId,
    view: Arc<crate::cluster::membership::View>,
    control: Arc<crate::cluster::control::ControlView>,
    serving: &'a crate::cluster::dataplane::Partitions,
}

/// Whether `n` holds a complete copy of the partition assigned as `a`.
pub(crate) fn complete(a: &crate::cluster::control::Assignment, n: NodeId) -> bool {
    a.previous.contains(&n) || (a.previous.is_empty() && a.replicas.contains(&n))
}

impl Locator<'_> {
    /// Whether gossip sees node `n` live (a scan of a handful of members: no set is built
    /// for reads that stay local).
    fn is_live(&self, n: NodeId) -> bool {
        self.view.members.iter().any(|m| m.id == n && m.live)
    }

    /// Where interest in a conversation of partition `p` is registered: its leader, when
    /// gossip sees it live (it pushes what it commits, and answers once it serves; a move's
    /// new leader serves before its copy counts as complete for reads).
    pub(crate) fn interest_at(&self, p: u16) -> Option<NodeId> {
        let a = self.control.machine.table.partitions.get(usize::from(p))?;
        (a.leader != self.me && self.is_live(a.leader)).then_some(a.leader)
    }

    /// Where partition `p` is read.
    pub(crate) fn locate(&self, p: u16) -> ReadAt {
        if self.serving.serving(p).is_some() {
            return ReadAt::Here;
        }
        let Some(a) = self.control.machine.table.partitions.get(usize::from(p)) else {
            return ReadAt::Here; // not placed yet: nothing is anywhere else either
        };
        if complete(a, self.me) {
            return ReadAt::Here;
        }
        std::iter::once(a.leader)
            .chain(a.replicas.iter().copied())
            .chain(a.previous.iter().copied())
            .find(|&n| n != self.me && complete(a, n) && self.is_live(n))
            .map_or(ReadAt::Nowhere, ReadAt::Node)
    }
}

/// Where a read of one conversation is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadAt {
    /// Here: clustering is off, or this node holds a readable copy of the partition.
    Here,
    /// On this node, the partition's leader.
    Node(NodeId),
    /// Nowhere right now (no leader known, or this node is taking the partition over).
    Nowhere,
}

impl Shard {
    /// Where reads of partition `p` are served (see [`Locator`]).
    pub(crate) fn read_at(&self, p: u16) -> ReadAt {
        match self.locator() {
            Some(l) => l.locate(p),
            None => ReadAt::Here,
        }
    }

    /// A snapshot of what [`Shard::read_at`] decides from (`None`: clustering is off).
    pub(crate) fn locator(&self) -> Option<Locator<'_>> {
        let cluster = self.cluster.as_ref()?;
        let view = cluster.gossip.borrow().clone();
        Some(Locator {
            me: view.self_id,
            view,
            control: cluster.control.borrow().clone(),
            serving: &cluster.routing.partitions,
        })
    }

    /// Where a user read ([`crate::net::handler::userread`]) goes: the partitions read here,
    /// and per other node the partitions read there (their leader). `None` while some
    /// partition has nowhere to be read.
    pub(crate) fn user_plan(
        &self,
    ) -> Option<(
        crate::cluster::placement::PartitionSet,
        Vec<(NodeId, crate::cluster::placement::PartitionSet)>,
    )> {
        use crate::cluster::placement::{PARTITION_COUNT, PartitionSet};
        let Some(locator) = self.locator() else { return Some((PartitionSet::all(), Vec::new())) };
        let mut here = PartitionSet::default();
        let mut remote: std::collections::BTreeMap<NodeId, PartitionSet> = Default::default();
        for p in (0..PARTITION_COUNT).filter_map(|p| u16::try_from(p).ok()) {
            match locator.locate(p) {
                ReadAt::Here => here.insert(p),
                ReadAt::Node(n) => remote.entry(n).or_default().insert(p),
                ReadAt::Nowhere => {
                    tracing::debug!(partition = p, "no live node holds a complete copy");
                    return None;
                }
            }
        }
        Some((here, remote.into_iter().collect()))
    }

    /// Serves a read another node forwarded (it holds no copy of the partition) from this
    /// node's store; one that this node cannot serve either (the partition moved) is answered
    /// `UNAVAILABLE`, and the client retries.
    pub(crate) fn serve_forwarded_read(
        &self,
        user: Arc<str>,
        request_id: u64,
        op: super::mailbox::ReadOp,
        reply: tokio::sync::oneshot::Sender<SharedFrame>,
    ) {
        if self.read_at(super::partition(op.conversation())) != ReadAt::Here {
            let _ = reply.send(Encoded::of(&super::error_frame(
                request_id,
                ErrorCode::Unavailable,
                "this node no longer holds the conversation; retry",
            )));
            return;
        }
        let storage = self.storage.clone();
        let limits = self.config.limits.clone();
        tokio::task::spawn_local(async move {
            let read =
                tokio::task::spawn_blocking(move || op.run(&storage.reader(), &user, &limits));
            let frame = match read.await {
                Ok(Ok(kind)) => ServerFrame::reply(request_id, kind),
                Ok(Err(r)) => super::error_frame(request_id, r.code, r.message),
                Err(_) => super::error_frame(request_id, ErrorCode::Internal, "internal error"),
            };
            let _ = reply.send(Encoded::of(&frame));
        });
    }

    /// Queues a request for the node that leads its conversation.
    pub(crate) fn forward(self: &Rc<Self>, to: NodeId, f: Forward) {
        let mut queues = self.forwards.borrow_mut();
        let tx = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::task::spawn_local(forward_loop(self.clone(), to, rx));
            tx
        });
        if let Err(mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f)) =
            tx.try_send(f)
        {
            drop(queues);
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
        let replicas: Vec<NodeId> = {
            let control = cluster.control.borrow();
            let p = usize::from(super::partition(conversation));
            control.machine.table.partitions.get(p).map(|a| a.replicas.clone()).unwrap_or_default()
        };
        self.push_to_nodes(replicas, conversation, frame, droppable);
    }

    /// Sends a push for `conversation`'s sessions to `nodes` (this one skipped), in order per
    /// node (best effort: a full queue drops it).
    pub(crate) fn push_to_nodes(
        self: &Rc<Self>,
        nodes: Vec<NodeId>,
        conversation: &Arc<str>,
        frame: &SharedFrame,
        droppable: bool,
    ) {
        let Some(cluster) = &self.cluster else { return };
        let me = cluster.gossip.borrow().self_id;
        let mut queues = self.pushes.borrow_mut();
        for node in nodes.into_iter().filter(|n| *n != me) {
            let tx = queues.entry(node).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::task::spawn_local(push_loop(self.clone(), node, rx));
                tx
            });
            let push = Push { conversation: conversation.clone(), frame: frame.clone(), droppable };
            let _ = tx.try_send(push);
        }
    }

    /// Renews this owner's followed conversations with the nodes they are read on, and hands
    /// what each answer catches up back to the owner (`super::interest`).
    pub(crate) fn refresh_followed(self: &Rc<Self>, items: Vec<(Arc<str>, u64)>) {
        let Some(cluster) = &self.cluster else { return };
        let me = cluster.gossip.borrow().self_id;
        let mut by_node: HashMap<NodeId, Vec<(Arc<str>, u64)>> = HashMap::new();
        let Some(locator) = self.locator() else { return };
        for (conversation, after) in items {
            if let Some(n) = locator.interest_at(super::partition(&conversation)) {
                by_node.entry(n).or_default().push((conversation, after));
            }
        }
        drop(locator);
        for (node, items) in by_node {
            // One refresh in flight per node: a slow leader is not asked again meanwhile.
            if !self.refreshing.borrow_mut().insert(node) {
                continue;
            }
            let shard = self.clone();
            tokio::task::spawn_local(async move {
                let request = super::interest::wire::Request {
                    node: me,
                    items: items
                        .iter()
                        .map(|(c, after)| super::interest::wire::Item {
                            conversation: c.to_string(),
                            after_seq: *after,
                            user: String::new(),
                        })
                        .collect(),
                };
                let replies = super::interest::post(&shard, node, request).await;
                shard.refreshing.borrow_mut().remove(&node);
                let Some(replies) = replies else { return };
                for ((conversation, _), reply) in items.into_iter().zip(replies) {
                    if reply.ok && !reply.entries.is_empty() {
                        let msg =
                            super::OwnerMsg::CaughtUp { conversation, entries: reply.entries };
                        shard.handle_owner(msg);
                    }
                }
            });
        }
    }

    /// Tells the live nodes without a complete copy of each conversation that a user was added
    /// to it, so that their sessions of that user follow it (best effort, one request per
    /// node; `super::interest`).
    pub(crate) fn follow_elsewhere(self: &Rc<Self>, items: Vec<(Arc<str>, Arc<str>)>) {
        let Some(locator) = self.locator() else { return };
        let mut by_node: HashMap<NodeId, Vec<super::interest::wire::Follow>> = HashMap::new();
        for (user, conversation) in items {
            let p = usize::from(super::partition(&conversation));
            let Some(a) = locator.control.machine.table.partitions.get(p) else { continue };
            let others = locator.view.members.iter().filter(|m| m.live && m.id != locator.me);
            for n in others.map(|m| m.id).filter(|n| !complete(a, *n)) {
                by_node.entry(n).or_default().push(super::interest::wire::Follow {
                    user: user.to_string(),
                    conversation: conversation.to_string(),
                });
            }
        }
        drop(locator);
        for (node, items) in by_node {
            let shard = self.clone();
            tokio::task::spawn_local(async move {
                let (Some(client), Some(addr)) = (shard.peer_client(), shard.peer_addr(node))
                else {
                    return;
                };
                let body = super::interest::wire::Follows { items }.encode_to_vec();
                let path = super::interest::FOLLOW_PATH;
                post_protobuf(&client, &addr, path, body, Duration::from_secs(2)).await;
            });
        }
    }

    /// Queues a presence report, snapshot or change for node `to` (`cluster::presence`); a
    /// full queue drops it (the next snapshot repairs reports).
    pub(crate) fn presence_to(self: &Rc<Self>, to: NodeId, item: presence::Out) {
        let mut queues = self.presence.borrow_mut();
        let tx = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::task::spawn_local(presence_loop(self.clone(), to, rx));
            tx
        });
        if tx.try_send(item).is_err() {
            metrics::counter!(crate::metrics::PRESENCE_DROPPED).increment(1);
        }
    }

    /// Asks node `to` for the presence of users homed there; `None` when it does not answer.
    pub(crate) async fn query_node(
        self: &Rc<Self>,
        to: NodeId,
        users: Vec<Arc<str>>,
    ) -> Option<Vec<switchboard_protocol::Presence>> {
        let client = self.peer_client()?;
        let addr = self.gossip_addr(to)?;
        let body = presence::wire::Query { users: users.iter().map(ToString::to_string).collect() }
            .encode_to_vec();
        let reply =
            post_protobuf(&client, &addr, presence::QUERY_PATH, body, Duration::from_secs(2))
                .await?;
        switchboard_protocol::PresenceList::decode(reply).ok().map(|l| l.presences)
    }

    /// The peer-port address of node `id`, per gossip.
    fn gossip_addr(&self, id: NodeId) -> Option<String> {
        let view = self.cluster.as_ref()?.gossip.borrow().clone();
        view.members.iter().find(|m| m.id == id).map(|m| m.gossip.to_string())
    }

    /// The peer-port address of node `id`, per the control plane's membership.
    pub(crate) fn peer_addr(&self, id: NodeId) -> Option<String> {
        let control = self.cluster.as_ref()?.control.borrow().clone();
        control.machine.membership.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// This shard's HTTP client for peers (one connection pool for every target).
    pub(crate) fn peer_client(&self) -> Option<reqwest::Client> {
        if let Some(c) = self.peer_client.get() {
            return Some(c.clone());
        }
        let bind = self.cluster.as_ref().map(|c| c.routing.bind);
        let client = crate::cluster::raft::peer_client(bind)
            .map_err(|e| tracing::error!(error = %e, "cannot build a peer client"))
            .ok()?;
        Some(self.peer_client.get_or_init(|| client).clone())
    }
}

/// A push for another node's sessions.
#[derive(Debug)]
pub(crate) struct Push {
    conversation: Arc<str>,
    frame: SharedFrame,
    droppable: bool,
}

async fn push_loop(shard: Rc<Shard>, to: NodeId, mut rx: mpsc::Receiver<Push>) {
    let Some(client) = shard.peer_client() else { return };
    while let Some(batch) = next_batch(&mut rx).await {
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
        post_protobuf(&client, &addr, DELIVER_PATH, body, Duration::from_secs(2)).await;
    }
}

/// Sends presence reports, snapshots and changes to node `to`, in order: a snapshot replaces
/// the reports queued before it.
async fn presence_loop(shard: Rc<Shard>, to: NodeId, mut rx: mpsc::Receiver<presence::Out>) {
    let Some(client) = shard.peer_client() else { return };
    // Numbers the batches: the receiver drops one that arrives after a later one (a request
    // that timed out here may still be served there).
    let mut seq = 0;
    while let Some(items) = next_batch(&mut rx).await {
        let Some(addr) = shard.gossip_addr(to) else { continue };
        let (node, generation) = match &shard.cluster {
            Some(c) => {
                let view = c.gossip.borrow();
                (view.self_id, view.generation)
            }
            None => return,
        };
        let new_batch = |seq: u64| presence::wire::Batch {
            node,
            generation,
            shard: u32::try_from(shard.id).unwrap_or(u32::MAX),
            seq,
            shards: u32::try_from(shard.count).unwrap_or(u32::MAX),
            ..presence::wire::Batch::default()
        };
        // A receiver applies a batch's changes before its online set: a change queued after a
        // set starts the next batch, so that it is applied after the set.
        seq += 1;
        let mut batches = vec![new_batch(seq)];
        for item in items {
            let Some(batch) = batches.last_mut() else { break };
            match item {
                presence::Out::Report(r) => batch.reports.push(r),
                presence::Out::Snapshot(snapshot) => {
                    batch.reports.clear();
                    batch.snapshot = Some(snapshot);
                }
                presence::Out::Changed(c) if batch.online.is_some() => {
                    seq += 1;
                    let mut next = new_batch(seq);
                    next.changed.push(c);
                    batches.push(next);
                }
                presence::Out::Changed(c) => batch.changed.push(c),
                presence::Out::Online(set) => batch.online = Some(set),
            }
        }
        for batch in batches {
            let body = batch.encode_to_vec();
            let sent = post_protobuf(&client, &addr, presence::PATH, body, Duration::from_secs(2))
                .await
                .is_some();
            let outcome = if sent { "ok" } else { "failed" };
            metrics::counter!(crate::metrics::PRESENCE_BATCHES, "outcome" => outcome).increment(1);
        }
    }
}

fn unavailable(request_id: u64) -> SharedFrame {
    Encoded::of(&super::error_frame(
        request_id,
        ErrorCode::Unavailable,
        "the conversation's leader could not be reached; retry",
    ))
}

async fn forward_loop(shard: Rc<Shard>, to: NodeId, mut rx: mpsc::Receiver<Forward>) {
    let client = shard.peer_client();
    while let Some(batch) = next_batch(&mut rx).await {
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
        let body = wire::ForwardBatch { requests }.encode_to_vec();
        let replies = match (&client, shard.peer_addr(to)) {
            (Some(client), Some(addr)) => {
                let timeout = FORWARD_TIMEOUT + Duration::from_secs(1);
                post_protobuf(client, &addr, FORWARD_PATH, body, timeout)
                    .await
                    .and_then(|b| wire::ForwardReplies::decode(b).ok())
                    .map(|r| r.replies)
            }
            _ => None,
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
