//! The partition-owner role: everything about a conversation is decided here.
//!
//! For each conversation the owner keeps, in memory: the last assigned seq, the durable seq,
//! the members, the shards with interested sessions, and the **pending map** of sends in a batch
//! that is not yet durable. A request is authorized against the in-memory membership, which
//! follows the log order (a change applies at the seq of its system entry).
//!
//! Writes go into the shard's open batch together with their *effects* (deliveries, acks,
//! replies, feed events). When the storage writer reports the batch durable, the effects run
//! in log order: deliveries to interested shards, then the ack to the sender; a retry of the
//! same idempotency key that arrived meanwhile gets the very same ack. Nothing is delivered or
//! acknowledged before it is durable.
//!
//! In a cluster ([`Routed`]) the owner of a partition on a node accepts writes only while the
//! node's replication engine serves the partition (it leads the current epoch and has applied
//! everything committed before it); elsewhere requests get `NOT_LEADER` with the leader's
//! address. Each partition's share of a batch becomes a replicated entry, and its effects run
//! once the entry is committed by a majority and applied here. When the serving epoch changes,
//! the cached conversations of the partition are reloaded from the store (which then holds
//! every committed entry) and whatever waited on the old epoch is failed back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message as _;
use switchboard_protocol::{
    self as pb, ConversationKind, Encoded, ErrorCode, FeedEventKind, HistoryVisibility, Role,
    ServerFrame, SharedFrame, encode_message_push, server_frame, system_event,
};

use super::SessionRef;
use super::mailbox::{
    Forward, HomeMsg, LocalMsg, Membership, NotifyMsg, Outgoing, OwnerMsg, OwnerOp, UserEvent,
};
use crate::config::{Config, Durability, LimitsConfig};
use crate::storage::{
    Committed, Ks, LoadedConversation, Storage, StorageError, StoredConversation, StoredEntry,
    StoredMember, WriteOp, encode_dedupe, keys,
};

/// Receipts (writes and pushes) and typing updates: at most one per member and conversation
/// per this interval.
const RECEIPT_INTERVAL: Duration = Duration::from_secs(1);
/// Largest `GetReceipts` page.
const MAX_RECEIPTS_PAGE: usize = 500;

/// The epoch a single node writes.
pub const SINGLE_NODE_EPOCH: u64 = 1;

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A failed request: the error code and message sent back.
#[derive(Debug)]
pub struct OpError {
    code: ErrorCode,
    message: String,
    /// For `NOT_LEADER`: the leader's client address.
    hint: Option<String>,
    /// For `NOT_LEADER`: the live leader a request may be forwarded to.
    leader: Option<crate::cluster::NodeId>,
}

impl OpError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), hint: None, leader: None }
    }

    fn frame(self, request_id: u64) -> SharedFrame {
        let mut frame = crate::shard::error_frame(request_id, self.code, self.message);
        if let (Some(hint), Some(server_frame::Kind::Error(e))) = (self.hint, frame.kind.as_mut()) {
            e.leader_hint = hint;
        }
        Encoded::of(&frame)
    }

    fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "conversation not found")
    }

    fn storage(e: &StorageError) -> Self {
        let (code, message) = e.report();
        Self::new(code, message)
    }
}

type PendingKey = (Arc<str>, String);

struct Pending {
    seq: u64,
    timestamp_ms: u64,
    waiters: Vec<(SessionRef, u64)>,
    /// When the send reached the owner (send→ack latency).
    started: Instant,
}

struct Conv {
    id: Arc<str>,
    partition: u16,
    record: StoredConversation,
    last_seq: u64,
    last_ts: u64,
    ordinal: u64,
    durable_seq: u64,
    members: HashMap<Arc<str>, StoredMember>,
    /// Bit i set: shard i has sessions receiving this conversation.
    interested: u64,
    pending: HashMap<PendingKey, Pending>,
    /// Replies released once `durable_seq` reaches their seq.
    waiting: Vec<(u64, SessionRef, SharedFrame)>,
    /// When each member's receipt was last written and pushed (coalescing).
    receipt_flushed: HashMap<Arc<str>, Instant>,
    /// Each member's last forwarded typing state.
    typing: HashMap<Arc<str>, (Instant, bool)>,
    /// Nodes without a copy that follow this conversation through this leader's pushes, and
    /// when each last renewed its interest (`super::interest`).
    nodes: HashMap<crate::cluster::NodeId, Instant>,
}

impl Conv {
    /// Sends `frame` to the nodes that follow this conversation and whose interest has not
    /// lapsed (lapsed ones are forgotten); nothing to do, and no clock read, when none does.
    fn push_to_following(&mut self, frame: &SharedFrame, droppable: bool, out: &mut Outgoing) {
        if self.nodes.is_empty() {
            return;
        }
        let now = Instant::now();
        self.nodes.retain(|_, at| now.duration_since(*at) < super::interest::LEASE);
        let nodes: Vec<crate::cluster::NodeId> = self.nodes.keys().copied().collect();
        if !nodes.is_empty() {
            out.nodes.push((nodes, self.id.clone(), frame.clone(), droppable));
        }
    }

    /// Replaces what the store holds (after the partition's serving epoch changed); keeps who
    /// is interested here.
    fn reload(&mut self, l: LoadedConversation) {
        let (last_seq, last_ts, ordinal) = l.head.unwrap_or((0, 0, 0));
        self.record = l.record;
        self.last_seq = last_seq;
        self.last_ts = last_ts;
        self.ordinal = ordinal;
        self.durable_seq = last_seq;
        self.members = l.members.into_iter().map(|(u, m)| (Arc::from(u), m)).collect();
    }

    /// A conversation with an empty log, no members and nobody interested.
    fn new(id: Arc<str>, partition: u16, record: StoredConversation, last_ts: u64) -> Self {
        Self {
            id,
            partition,
            record,
            last_seq: 0,
            last_ts,
            ordinal: 0,
            durable_seq: 0,
            members: HashMap::new(),
            interested: 0,
            pending: HashMap::new(),
            waiting: Vec::new(),
            receipt_flushed: HashMap::new(),
            typing: HashMap::new(),
            nodes: HashMap::new(),
        }
    }

    fn from_loaded(id: Arc<str>, partition: u16, l: LoadedConversation) -> Self {
        let mut conv = Self::new(id, partition, StoredConversation::default(), 0);
        conv.reload(l);
        conv
    }

    fn kind(&self) -> ConversationKind {
        ConversationKind::try_from(self.record.kind).unwrap_or(ConversationKind::Unspecified)
    }

    /// Next timestamp: wall clock, but never behind the previous entry's.
    fn next_ts(&mut self) -> u64 {
        self.last_ts = now_ms().max(self.last_ts);
        self.last_ts
    }

    fn summary(&self, request_id: u64, created: bool) -> SharedFrame {
        Encoded::of(&ServerFrame::reply(
            request_id,
            server_frame::Kind::Conversation(pb::Conversation {
                conversation_id: self.id.to_string(),
                kind: self.record.kind,
                name: self.record.name.clone(),
                visibility: self.record.visibility,
                created_at_ms: self.record.created_at_ms,
                created_by: self.record.created_by.clone(),
                created,
                // Only what is durable: replies go out once seq 1 is.
                last_seq: self.durable_seq.max(1),
                member_count: u32::try_from(self.members.len()).unwrap_or(u32::MAX),
            }),
        ))
    }

    fn require_member(&self, user: &str) -> Result<&StoredMember, OpError> {
        self.members.get(user).ok_or_else(OpError::not_found)
    }

    fn require_group_admin(&self, user: &str) -> Result<(), OpError> {
        let m = self.require_member(user)?;
        if self.kind() != ConversationKind::Group {
            return Err(OpError::new(
                ErrorCode::BadRequest,
                "direct conversations have fixed members",
            ));
        }
        if m.role != Role::Admin as i32 {
            return Err(OpError::new(ErrorCode::Forbidden, "only group admins change membership"));
        }
        Ok(())
    }
}

enum Effect {
    Entry {
        conv: Arc<str>,
        seq: u64,
        frame: SharedFrame,
        skip: Option<SessionRef>,
        pending: Option<PendingKey>,
        revoke: Vec<Arc<str>>,
        /// The sender of a user message (push notifications for offline members).
        notify: Option<Arc<str>>,
    },
    /// A frame for every interested session but `skip` once durable (receipt changes).
    Broadcast {
        conv: Arc<str>,
        frame: SharedFrame,
        skip: Option<SessionRef>,
    },
    Feed {
        user: Arc<str>,
        event: pb::FeedEvent,
    },
}

#[derive(Default)]
struct OpenBatch {
    /// The epoch its writes were accepted in (replicated entries carry it).
    epoch: u64,
    ops: Vec<WriteOp>,
    effects: Vec<Effect>,
    dirty_members: HashSet<(Arc<str>, Arc<str>)>,
}

/// The open batch of partition `p`.
fn batch<'a>(
    open: &'a mut BTreeMap<u16, OpenBatch>,
    epochs: &HashMap<u16, u64>,
    p: u16,
) -> &'a mut OpenBatch {
    open.entry(p).or_insert_with(|| OpenBatch {
        epoch: epochs.get(&p).copied().unwrap_or(SINGLE_NODE_EPOCH),
        ..OpenBatch::default()
    })
}

/// A closed batch, for [`crate::shard::Shard::flush`].
#[derive(Debug)]
pub enum Flush {
    /// For the local storage writer: everything on a single node; in a cluster, the writes
    /// that belong to no conversation (presence, push queue).
    Local {
        /// The owner's token.
        token: u64,
        /// The writes.
        ops: Vec<WriteOp>,
    },
    /// One partition's share, to replicate (cluster).
    Replicate {
        /// The owner's token.
        token: u64,
        /// The partition.
        partition: u16,
        /// The epoch the writes were accepted in.
        epoch: u64,
        /// The writes.
        ops: Vec<WriteOp>,
    },
}

/// The cluster as an owner needs it.
#[derive(Debug, Clone)]
pub struct Routed {
    /// Which partitions this node serves, and their leaders.
    pub partitions: Arc<crate::cluster::dataplane::Partitions>,
    /// Gossip's view, for the leaders' client addresses.
    pub gossip: tokio::sync::watch::Receiver<Arc<crate::cluster::membership::View>>,
    /// The partition table (which partitions this node holds a complete copy of).
    pub control: Option<tokio::sync::watch::Receiver<Arc<crate::cluster::control::ControlView>>>,
}

impl Routed {
    /// Whether this node reads partition `p` from its own store: it serves it, or holds a
    /// complete copy (`shard::Locator`); true when the table is not known.
    fn holds(&self, p: u16) -> bool {
        if self.partitions.serving(p).is_some() {
            return true;
        }
        let Some(control) = &self.control else { return true };
        let me = self.gossip.borrow().self_id;
        let control = control.borrow();
        control.machine.table.partitions.get(usize::from(p)).is_none_or(|a| super::complete(a, me))
    }

    /// Why this node does not accept writes for `p`.
    fn refuse(&self, p: u16) -> OpError {
        let view = self.gossip.borrow();
        match self.partitions.leader(p) {
            Some(leader) if leader == view.self_id => OpError::new(
                ErrorCode::Unavailable,
                "this node is taking over the conversation; retry shortly",
            ),
            leader => {
                let live = leader.and_then(|id| view.members.iter().find(|m| m.id == id && m.live));
                OpError {
                    code: ErrorCode::NotLeader,
                    message: "another node leads this conversation".to_owned(),
                    hint: live.and_then(|m| m.tcp).map(|a| a.to_string()),
                    leader: live.map(|m| m.id),
                }
            }
        }
    }
}

impl OpenBatch {
    /// Appends one log entry: its record, and the delivery to run once durable.
    fn entry(
        &mut self,
        conv: &mut Conv,
        msg: &pb::Message,
        skip: Option<SessionRef>,
        pending: Option<PendingKey>,
        revoke: Vec<Arc<str>>,
        notify: Option<Arc<str>>,
    ) {
        let encoded = msg.encode_to_vec();
        let frame = Encoded::new(encode_message_push(&encoded));
        let value =
            StoredEntry { epoch: self.epoch, ordinal: conv.ordinal, message: Bytes::from(encoded) }
                .encode_to_vec();
        self.ops.push(WriteOp::Put(
            Ks::Messages,
            keys::message_key(conv.partition, &conv.id, msg.seq),
            value,
        ));
        conv.last_seq = msg.seq;
        self.effects.push(Effect::Entry {
            conv: conv.id.clone(),
            seq: msg.seq,
            frame,
            skip,
            pending,
            revoke,
            notify,
        });
    }

    /// Writes a member's watermarks and pushes them to the conversation once durable.
    fn flush_receipt(
        &mut self,
        conv: &mut Conv,
        user: &Arc<str>,
        now: Instant,
        skip: Option<SessionRef>,
    ) {
        let Some(m) = conv.members.get(user) else { return };
        self.put_member(conv, user, m);
        self.dirty_members.remove(&(conv.id.clone(), user.clone()));
        let frame =
            Encoded::of(&ServerFrame::push(server_frame::Kind::ReceiptEvent(pb::Receipt {
                conversation_id: conv.id.to_string(),
                user_id: user.to_string(),
                delivered_seq: m.delivered_seq,
                read_seq: m.read_seq,
            })));
        self.effects.push(Effect::Broadcast { conv: conv.id.clone(), frame, skip });
        conv.receipt_flushed.insert(user.clone(), now);
    }

    fn put_conversation(&mut self, conv: &mut Conv) {
        conv.record.member_count = u32::try_from(conv.members.len()).unwrap_or(u32::MAX);
        self.ops.push(WriteOp::Put(
            Ks::Conversations,
            keys::conversation_key(&conv.id),
            conv.record.encode_to_vec(),
        ));
    }

    fn put_member(&mut self, conv: &Conv, user: &Arc<str>, m: &StoredMember) {
        self.ops.push(WriteOp::Put(
            Ks::Members,
            keys::member_key(&conv.id, user),
            m.encode_to_vec(),
        ));
    }

    fn feed(
        &mut self,
        conv: &Conv,
        user: &Arc<str>,
        kind: FeedEventKind,
        seq: u64,
        actor: &str,
        ts: u64,
    ) {
        let event = pb::FeedEvent {
            user_seq: 0,
            kind: kind as i32,
            conversation_id: conv.id.to_string(),
            conversation_seq: seq,
            actor: actor.to_owned(),
            timestamp_ms: ts,
            conversation_kind: conv.record.kind,
            conversation_name: conv.record.name.clone(),
        };
        self.ops.push(WriteOp::FeedAppend { user: user.clone(), event: event.clone() });
        self.effects.push(Effect::Feed { user: user.clone(), event });
    }

    fn add_member(&mut self, conv: &mut Conv, user: &Arc<str>, role: Role, seq: u64) {
        let m = StoredMember {
            epoch: self.epoch,
            role: role as i32,
            joined_seq: seq,
            read_seq: 0,
            delivered_seq: 0,
        };
        self.put_member(conv, user, &m);
        self.ops.push(WriteOp::Put(
            Ks::Memberships,
            keys::membership_key(user, &conv.id),
            seq.to_be_bytes().to_vec(),
        ));
        conv.members.insert(user.clone(), m);
    }

    fn remove_member(&mut self, conv: &mut Conv, user: &Arc<str>) {
        self.ops.push(WriteOp::Delete(Ks::Members, keys::member_key(&conv.id, user)));
        self.ops.push(WriteOp::Delete(Ks::Memberships, keys::membership_key(user, &conv.id)));
        self.dirty_members.remove(&(conv.id.clone(), user.clone()));
        conv.members.remove(user);
    }
}

/// A batch handed over: its effects, and for a replicated share (partition, epoch).
type Inflight = (Vec<Effect>, Option<(u16, u64)>);

/// The owner state of one shard.
pub struct Owner {
    shard: usize,
    shards: usize,
    storage: Arc<Storage>,
    limits: LimitsConfig,
    convs: HashMap<Arc<str>, Conv>,
    /// Open batches by partition.
    open: BTreeMap<u16, OpenBatch>,
    /// Writes that belong to no conversation.
    local_ops: Vec<WriteOp>,
    next_token: u64,
    /// Batches handed over and not completed: their effects, and for a replicated share its
    /// partition and the epoch it was accepted in.
    inflight: HashMap<u64, Inflight>,
    /// Replicated shares in flight, by partition.
    replicating: HashMap<u16, usize>,
    /// Partitions whose share failed in the epoch they are served in: requests get
    /// `UNAVAILABLE` until none of their shares is in flight, then the state is reloaded (a
    /// reload earlier would miss entries that still commit, and reuse their seqs).
    fenced: HashSet<u16>,
    poisoned: bool,
    /// In a cluster: the partitions this node serves, and the epoch the cached state of each
    /// was last validated in.
    routing: Option<Routed>,
    epochs: HashMap<u16, u64>,
    /// Receipts changed within a second of their last flush: (conversation, user).
    pending_receipts: HashSet<(Arc<str>, Arc<str>)>,
    /// Push notifications: conversations up to this size notify offline members.
    push_group_max: Option<usize>,
    typing_expires_ms: u32,
    /// Send→ack latency, registered once (not looked up per acknowledged message).
    ack_latency: metrics::Histogram,
    /// Conversations this node holds no copy of, followed through their leaders' pushes.
    followed: HashMap<Arc<str>, super::interest::Followed>,
    /// When the followed conversations were last refreshed.
    refreshed: Instant,
}

impl std::fmt::Debug for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("shard", &self.shard)
            .field("conversations", &self.convs.len())
            .finish_non_exhaustive()
    }
}

fn load<'a>(
    convs: &'a mut HashMap<Arc<str>, Conv>,
    storage: &Storage,
    id: &str,
) -> Result<Option<&'a mut Conv>, OpError> {
    if !convs.contains_key(id) {
        let partition = super::partition(id);
        match storage.load_conversation(partition, id) {
            Ok(Some(l)) => {
                let id: Arc<str> = Arc::from(id);
                convs.insert(id.clone(), Conv::from_loaded(id, partition, l));
            }
            Ok(None) => return Ok(None),
            Err(e) => return Err(OpError::storage(&e)),
        }
    }
    Ok(convs.get_mut(id))
}

fn ack_frame(
    request_id: u64,
    conv: &str,
    seq: u64,
    timestamp_ms: u64,
    client_msg_id: &str,
    duplicate: bool,
) -> SharedFrame {
    Encoded::of(&ServerFrame::reply(
        request_id,
        server_frame::Kind::SendAck(pb::SendAck {
            conversation_id: conv.to_owned(),
            seq,
            timestamp_ms,
            client_msg_id: client_msg_id.to_owned(),
            duplicate,
        }),
    ))
}

fn membership_frame(request_id: u64, conv: &str, seq: u64, changed: &[Arc<str>]) -> SharedFrame {
    Encoded::of(&ServerFrame::reply(
        request_id,
        server_frame::Kind::Membership(pb::MembershipResult {
            conversation_id: conv.to_owned(),
            seq,
            changed: changed.iter().map(ToString::to_string).collect(),
        }),
    ))
}

fn system_message(
    conv: &str,
    seq: u64,
    actor: &str,
    ts: u64,
    kind: system_event::Kind,
) -> pb::Message {
    pb::Message {
        conversation_id: conv.to_owned(),
        seq,
        sender: actor.to_owned(),
        timestamp_ms: ts,
        client_msg_id: String::new(),
        content: None,
        system: Some(pb::SystemEvent { kind: Some(kind) }),
    }
}

fn names(users: &[Arc<str>]) -> Vec<String> {
    users.iter().map(ToString::to_string).collect()
}

/// Who removes members, which decides the check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// A member leaves a group.
    Leave,
    /// A group admin removes members.
    ByAdmin,
    /// An operator, through the admin API: no membership check (groups only).
    ByOperator,
}

impl Owner {
    /// The owner role of shard `shard` of `shards`.
    #[must_use]
    pub fn new(
        shard: usize,
        shards: usize,
        storage: Arc<Storage>,
        config: &Config,
        routing: Option<Routed>,
    ) -> Self {
        Self {
            shard,
            shards,
            storage,
            limits: config.limits.clone(),
            convs: HashMap::new(),
            open: BTreeMap::new(),
            local_ops: Vec::new(),
            next_token: 1,
            inflight: HashMap::new(),
            replicating: HashMap::new(),
            fenced: HashSet::new(),
            poisoned: false,
            routing,
            epochs: HashMap::new(),
            pending_receipts: HashSet::new(),
            push_group_max: config.push.webhook_url.as_ref().map(|_| config.push.max_group_size),
            typing_expires_ms: u32::try_from(config.presence.typing_expires_ms).unwrap_or(u32::MAX),
            ack_latency: metrics::histogram!(crate::metrics::SEND_ACK_SECONDS),
            followed: HashMap::new(),
            refreshed: Instant::now(),
        }
    }

    /// Writes every receipt still waiting for its coalescing second (graceful shutdown).
    pub fn flush_all_receipts(&mut self) {
        let now = Instant::now();
        for (conv_id, user) in std::mem::take(&mut self.pending_receipts) {
            let writable = self.convs.get(&conv_id).is_some_and(|c| self.writable(c.partition));
            if let (Some(conv), true) = (self.convs.get_mut(&conv_id), writable) {
                batch(&mut self.open, &self.epochs, conv.partition)
                    .flush_receipt(conv, &user, now, None);
            }
        }
    }

    /// Whether writes of partition `p` may be batched now: always on a single node; in a
    /// cluster, only in the epoch its cached state was validated in and while not fenced (a
    /// coalesced receipt waits until a request validates the partition again).
    fn writable(&self, p: u16) -> bool {
        self.routing.is_none() || (self.epochs.contains_key(&p) && !self.fenced.contains(&p))
    }

    /// Adds writes that carry no effects (presence last-seen, push queue) to the open batch.
    pub fn append_ops(&mut self, ops: Vec<WriteOp>) {
        self.local_ops.extend(ops);
    }

    /// Periodic work: receipts whose coalescing second has passed are written and pushed;
    /// stale typing states are forgotten.
    pub fn tick(&mut self, now: Instant, out: &mut Outgoing) {
        if self.routing.is_some() && now.duration_since(self.refreshed) >= super::interest::REFRESH
        {
            self.refreshed = now;
            self.rehome_interest();
            out.refresh.extend(self.followed.iter().map(|(c, f)| (c.clone(), f.last_seq)));
        }
        let due: Vec<(Arc<str>, Arc<str>)> = self
            .pending_receipts
            .iter()
            .filter(|(conv, user)| {
                self.convs.get(conv).is_some_and(|c| self.writable(c.partition))
                    && self
                        .convs
                        .get(conv)
                        .and_then(|c| c.receipt_flushed.get(user))
                        .is_none_or(|t| now.duration_since(*t) >= RECEIPT_INTERVAL)
            })
            .cloned()
            .collect();
        for key in due {
            self.pending_receipts.remove(&key);
            let (conv_id, user) = key;
            if let Some(conv) = self.convs.get_mut(&conv_id) {
                batch(&mut self.open, &self.epochs, conv.partition)
                    .flush_receipt(conv, &user, now, None);
                out.flush = true;
            }
        }
        let expiry = Duration::from_millis(u64::from(self.typing_expires_ms));
        for conv in self.convs.values_mut() {
            if !conv.typing.is_empty() {
                conv.typing.retain(|_, (at, _)| now.duration_since(*at) < expiry);
            }
        }
    }

    /// Conversations held in memory.
    #[must_use]
    pub fn loaded(&self) -> usize {
        self.convs.len()
    }

    /// No batch open or in flight.
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.inflight.is_empty() && self.open.is_empty() && self.local_ops.is_empty()
    }

    /// Handles a message for this role.
    pub fn handle(&mut self, msg: OwnerMsg, out: &mut Outgoing) {
        match msg {
            OwnerMsg::Request { from, user, request_id, op, forwarded } => {
                let result = if self.poisoned {
                    Err(OpError::new(ErrorCode::Unavailable, "storage failed; broker is stopping"))
                } else if let Err(e) = self.check_serving(op.conversation(), out) {
                    if let (Some(leader), false) = (e.leader, forwarded) {
                        // Another node leads: it answers, through this node.
                        let op = super::mailbox::Remote::Owner(op);
                        out.forward.push((leader, Forward { from, user, request_id, op }));
                        return;
                    }
                    Err(e)
                } else if op.grows() && self.storage.is_full() {
                    // Checked here too, not only where the client connected: in a cluster the
                    // leader's disk is the one this write lands on.
                    Err(OpError::new(
                        ErrorCode::StorageFull,
                        "the broker's disk is nearly full; writes are refused until space is freed",
                    ))
                } else {
                    // An operator's removal (admin API) skips the group-admin check.
                    let how = if matches!(op, OwnerOp::ForceRemove(_)) {
                        Removal::ByOperator
                    } else {
                        Removal::ByAdmin
                    };
                    match op {
                        OwnerOp::Send(req) => self.send(from, &user, request_id, req, out),
                        OwnerOp::Create { conversation_id, request } => {
                            self.create(from, &user, request_id, conversation_id, request, out)
                        }
                        OwnerOp::AddMembers(req) => {
                            self.add_members(from, &user, request_id, req, out)
                        }
                        OwnerOp::RemoveMembers(req) | OwnerOp::ForceRemove(req) => {
                            let users: Vec<Arc<str>> =
                                req.users.iter().map(|u| Arc::from(u.as_str())).collect();
                            self.remove(
                                from,
                                &user,
                                request_id,
                                &req.conversation_id,
                                users,
                                how,
                                out,
                            )
                        }
                        OwnerOp::Leave(req) => self.remove(
                            from,
                            &user,
                            request_id,
                            &req.conversation_id,
                            vec![user.clone()],
                            Removal::Leave,
                            out,
                        ),
                        OwnerOp::MarkRead(req) => self.mark(
                            from,
                            &user,
                            request_id,
                            &req.conversation_id,
                            req.seq,
                            true,
                            out,
                        ),
                        OwnerOp::MarkDelivered(req) => self.mark(
                            from,
                            &user,
                            request_id,
                            &req.conversation_id,
                            req.seq,
                            false,
                            out,
                        ),
                        OwnerOp::Typing(req) => self.typing(from, &user, request_id, &req, out),
                        OwnerOp::GetReceipts(req) => {
                            self.receipts(from, &user, request_id, &req, out)
                        }
                    }
                };
                if let Err(e) = result {
                    out.to_session(from, e.frame(request_id), true);
                }
            }
            OwnerMsg::Subscribe { shard, user, sessions, conversations, token } => {
                let outcomes = conversations
                    .iter()
                    .map(|id| match self.current(id) {
                        Ok(Some(c)) if c.members.contains_key(&user) => {
                            c.interested |= 1 << shard;
                            Membership::Member
                        }
                        Ok(_) => Membership::NotMember,
                        Err(_) => Membership::Unavailable,
                    })
                    .collect();
                out.push_local(
                    shard,
                    LocalMsg::Subscribed { token, sessions, conversations, outcomes },
                );
            }
            OwnerMsg::Deliver { conversation, frame, droppable } => {
                if self.followed.contains_key(&conversation) {
                    self.deliver_followed(&conversation, &frame, droppable, out);
                }
                // From the conversation's leader on another node (typing, receipts).
                let Some(c) = self.convs.get(&conversation) else { return };
                deliver(out, self.shards, c.interested, &conversation, &frame, droppable, &[]);
            }
            OwnerMsg::Unsubscribe { shard, conversation } => {
                if let Some(c) = self.convs.get_mut(&conversation) {
                    c.interested &= !(1 << shard);
                }
                if let Some(f) = self.followed.get_mut(&conversation) {
                    f.interested &= !(1 << shard);
                    if f.interested == 0 {
                        self.followed.remove(&conversation);
                    }
                }
            }
            OwnerMsg::Interest { node, user, conversation, after_seq, reply } => {
                let _ = reply.send(self.interest(node, user, &conversation, after_seq, out));
            }
            OwnerMsg::SubscribeFollowed { shard, user, sessions, conversations, token } => {
                let mut ids = Vec::with_capacity(conversations.len());
                let mut outcomes = Vec::with_capacity(conversations.len());
                for (id, head) in conversations {
                    outcomes.push(match head {
                        // A removal delivered here after the leader's answer is newer than it.
                        Some(head)
                            if self
                                .followed
                                .get(&id)
                                .and_then(|f| f.removed.get(&user))
                                .is_none_or(|&at| at <= head) =>
                        {
                            let f = self.followed.entry(id.clone()).or_default();
                            if f.interested == 0 {
                                f.last_seq = head;
                            }
                            f.interested |= 1 << shard;
                            Membership::Member
                        }
                        _ => Membership::NotMember,
                    });
                    ids.push(id);
                }
                out.push_local(
                    shard,
                    LocalMsg::Subscribed { token, sessions, conversations: ids, outcomes },
                );
            }
            OwnerMsg::CaughtUp { conversation, entries } => {
                for raw in entries {
                    let frame = Encoded::new(encode_message_push(&raw));
                    self.deliver_followed(&conversation, &frame, false, out);
                }
            }
        }
    }

    fn send(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        req: pb::Send,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, &req.conversation_id)? else {
            return Err(OpError::not_found());
        };
        // A repeated key gets its original ack, even if the sender has left since: the key is
        // the sender's own, so this reveals nothing.
        let key: PendingKey = (user.clone(), req.client_msg_id);
        if let Some(p) = conv.pending.get_mut(&key) {
            p.waiters.push((from, request_id));
            return Ok(());
        }
        if let Some((seq, ts)) =
            self.storage.dedupe(&conv.id, user, &key.1).map_err(|e| OpError::storage(&e))?
        {
            out.to_session(from, ack_frame(request_id, &conv.id, seq, ts, &key.1, true), true);
            return Ok(());
        }
        conv.require_member(user)?;
        let seq = conv.last_seq + 1;
        let ts = conv.next_ts();
        conv.ordinal += 1;
        let msg = pb::Message {
            conversation_id: conv.id.to_string(),
            seq,
            sender: user.to_string(),
            timestamp_ms: ts,
            client_msg_id: key.1.clone(),
            content: req.content,
            system: None,
        };
        let open = batch(&mut self.open, &self.epochs, conv.partition);
        open.ops.push(WriteOp::Put(
            Ks::Dedupe,
            keys::dedupe_key(&conv.id, user, &key.1),
            encode_dedupe(seq, ts),
        ));
        open.entry(conv, &msg, Some(from), Some(key.clone()), Vec::new(), Some(user.clone()));
        // A member's own send marks everything up to it as read (written once per batch).
        if let Some(m) = conv.members.get_mut(user) {
            m.read_seq = m.read_seq.max(seq);
            m.delivered_seq = m.delivered_seq.max(seq);
            open.dirty_members.insert((conv.id.clone(), user.clone()));
        }
        let started = Instant::now();
        conv.pending.insert(
            key,
            Pending { seq, timestamp_ms: ts, waiters: vec![(from, request_id)], started },
        );
        out.flush = true;
        Ok(())
    }

    fn create(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        id: Arc<str>,
        req: pb::CreateConversation,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let kind = ConversationKind::try_from(req.kind).unwrap_or(ConversationKind::Unspecified);
        if let Some(conv) = load(&mut self.convs, &self.storage, &id)? {
            if !conv.members.contains_key(user) {
                return Err(OpError::new(ErrorCode::AlreadyExists, "conversation id is taken"));
            }
            let frame = conv.summary(request_id, false);
            if conv.durable_seq >= 1 {
                out.to_session(from, frame, true);
            } else {
                conv.waiting.push((1, from, frame));
            }
            return Ok(());
        }
        let mut members: Vec<Arc<str>> =
            req.members.iter().map(|m| Arc::from(m.as_str())).collect();
        members.push(user.clone());
        members.sort();
        members.dedup();
        if members.len() > self.limits.max_group_members {
            return Err(OpError::new(
                ErrorCode::LimitExceeded,
                format!("a group has at most {} members", self.limits.max_group_members),
            ));
        }
        let visibility = if req.visibility == HistoryVisibility::Joined as i32 {
            HistoryVisibility::Joined
        } else {
            HistoryVisibility::Shared
        };
        let ts = now_ms();
        let record = StoredConversation {
            epoch: self.epochs.get(&super::partition(&id)).copied().unwrap_or(SINGLE_NODE_EPOCH),
            kind: kind as i32,
            name: req.name.clone(),
            visibility: visibility as i32,
            created_at_ms: ts,
            created_by: user.to_string(),
            member_count: 0,
        };
        let partition = super::partition(&id);
        let conv = self
            .convs
            .entry(id.clone())
            .or_insert_with(|| Conv::new(id.clone(), partition, record, ts));
        let open = batch(&mut self.open, &self.epochs, partition);
        for m in &members {
            let role = if m == user && kind == ConversationKind::Group {
                Role::Admin
            } else {
                Role::Member
            };
            open.add_member(conv, m, role, 1);
        }
        open.put_conversation(conv);
        let msg = system_message(
            &id,
            1,
            user,
            ts,
            system_event::Kind::Created(pb::ConversationCreated {
                kind: kind as i32,
                name: req.name,
                members: names(&members),
                visibility: visibility as i32,
            }),
        );
        open.entry(conv, &msg, None, None, Vec::new(), None);
        for m in &members {
            open.feed(conv, m, FeedEventKind::Added, 1, user, ts);
        }
        let frame = conv.summary(request_id, true);
        conv.waiting.push((1, from, frame));
        out.flush = true;
        Ok(())
    }

    fn add_members(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        req: pb::AddMembers,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, &req.conversation_id)? else {
            return Err(OpError::not_found());
        };
        conv.require_group_admin(user)?;
        let mut added: Vec<Arc<str>> = req
            .users
            .iter()
            .filter(|u| !conv.members.contains_key(u.as_str()))
            .map(|u| Arc::from(u.as_str()))
            .collect();
        added.sort();
        added.dedup();
        if added.is_empty() {
            out.to_session(from, membership_frame(request_id, &conv.id, 0, &[]), true);
            return Ok(());
        }
        if conv.members.len() + added.len() > self.limits.max_group_members {
            return Err(OpError::new(
                ErrorCode::LimitExceeded,
                format!("a group has at most {} members", self.limits.max_group_members),
            ));
        }
        let seq = conv.last_seq + 1;
        let ts = conv.next_ts();
        let open = batch(&mut self.open, &self.epochs, conv.partition);
        for u in &added {
            open.add_member(conv, u, Role::Member, seq);
        }
        open.put_conversation(conv);
        let msg = system_message(
            &conv.id,
            seq,
            user,
            ts,
            system_event::Kind::MembersAdded(pb::MembersAdded { users: names(&added) }),
        );
        open.entry(conv, &msg, None, None, Vec::new(), None);
        for u in &added {
            open.feed(conv, u, FeedEventKind::Added, seq, user, ts);
        }
        conv.waiting.push((seq, from, membership_frame(request_id, &conv.id, seq, &added)));
        out.flush = true;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    /// Removes `users` from a group (or, leaving, the caller), as one system entry.
    fn remove(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        conv_id: &str,
        users: Vec<Arc<str>>,
        how: Removal,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, conv_id)? else {
            return Err(OpError::not_found());
        };
        let leaving = how == Removal::Leave;
        match how {
            Removal::Leave => {
                conv.require_member(user)?;
                if conv.kind() != ConversationKind::Group {
                    return Err(OpError::new(
                        ErrorCode::BadRequest,
                        "direct conversations cannot be left",
                    ));
                }
            }
            Removal::ByAdmin => conv.require_group_admin(user)?,
            Removal::ByOperator => {
                if conv.kind() != ConversationKind::Group {
                    return Err(OpError::new(
                        ErrorCode::BadRequest,
                        "direct conversations have fixed members",
                    ));
                }
            }
        }
        let mut removed: Vec<Arc<str>> =
            users.into_iter().filter(|u| conv.members.contains_key(u)).collect();
        removed.sort();
        removed.dedup();
        if removed.is_empty() {
            out.to_session(from, membership_frame(request_id, &conv.id, 0, &[]), true);
            return Ok(());
        }
        let seq = conv.last_seq + 1;
        let ts = conv.next_ts();
        let kind = if leaving {
            system_event::Kind::MemberLeft(pb::MemberLeft { user: user.to_string() })
        } else {
            system_event::Kind::MembersRemoved(pb::MembersRemoved { users: names(&removed) })
        };
        let open = batch(&mut self.open, &self.epochs, conv.partition);
        for u in &removed {
            open.remove_member(conv, u);
        }
        open.put_conversation(conv);
        let msg = system_message(&conv.id, seq, user, ts, kind);
        open.entry(conv, &msg, None, None, removed.clone(), None);
        for u in &removed {
            open.feed(conv, u, FeedEventKind::Removed, seq, user, ts);
        }
        conv.waiting.push((seq, from, membership_frame(request_id, &conv.id, seq, &removed)));
        out.flush = true;
        Ok(())
    }

    /// `MarkRead` / `MarkDelivered`: watermarks only move forward, never past the durable log,
    /// and read implies delivered. The reply is immediate and the change is written with the
    /// next batch; the push to the conversation is coalesced to one per member and conversation
    /// per second (the first change after a quiet second goes out at once, later ones at the
    /// end of the second).
    #[allow(clippy::too_many_arguments)]
    fn mark(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        conv_id: &str,
        seq: u64,
        read: bool,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, conv_id)? else {
            return Err(OpError::not_found());
        };
        let seq = seq.min(conv.durable_seq);
        let Some(m) = conv.members.get_mut(user) else { return Err(OpError::not_found()) };
        let mut changed = false;
        if read && seq > m.read_seq {
            m.read_seq = seq;
            changed = true;
        }
        let delivered = seq.max(m.read_seq);
        if delivered > m.delivered_seq {
            m.delivered_seq = delivered;
            changed = true;
        }
        let receipt = pb::Receipt {
            conversation_id: conv.id.to_string(),
            user_id: user.to_string(),
            delivered_seq: m.delivered_seq,
            read_seq: m.read_seq,
        };
        let read_seq = m.read_seq;
        if changed {
            let now = Instant::now();
            let quiet = conv
                .receipt_flushed
                .get(user)
                .is_none_or(|t| now.duration_since(*t) >= RECEIPT_INTERVAL);
            if quiet {
                batch(&mut self.open, &self.epochs, conv.partition).flush_receipt(
                    conv,
                    user,
                    now,
                    Some(from),
                );
                out.flush = true;
            } else {
                // Written with the next batch (a reader who reconnects at once lists what they
                // read); pushed, and written again with the latest values, at the end of the
                // coalescing second.
                batch(&mut self.open, &self.epochs, conv.partition)
                    .dirty_members
                    .insert((conv.id.clone(), user.clone()));
                out.flush = true;
                self.pending_receipts.insert((conv.id.clone(), user.clone()));
            }
            if read && self.push_group_max.is_some() {
                out.home.push((
                    user.clone(),
                    HomeMsg::Read { user: user.clone(), conversation: conv.id.clone(), read_seq },
                ));
            }
        }
        out.to_session(
            from,
            Encoded::of(&ServerFrame::reply(request_id, server_frame::Kind::Receipt(receipt))),
            true,
        );
        Ok(())
    }

    /// `Typing`: forwarded to the members online now, at most once per second per member while
    /// typing continues; a stop is forwarded once. Never stored.
    fn typing(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        req: &pb::Typing,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, &req.conversation_id)? else {
            return Err(OpError::not_found());
        };
        conv.require_member(user)?;
        let now = Instant::now();
        let forward = match conv.typing.get(user) {
            Some((at, active)) if *active == req.active => {
                req.active && now.duration_since(*at) >= RECEIPT_INTERVAL
            }
            Some(_) => true,
            None => req.active,
        };
        if forward {
            conv.typing.insert(user.clone(), (now, req.active));
            let frame =
                Encoded::of(&ServerFrame::push(server_frame::Kind::Typing(pb::TypingEvent {
                    conversation_id: conv.id.to_string(),
                    user_id: user.to_string(),
                    active: req.active,
                    expires_in_ms: self.typing_expires_ms,
                })));
            if self.routing.is_some() {
                out.peers.push((conv.id.clone(), frame.clone(), true));
                conv.push_to_following(&frame, true, out);
            }
            for shard in (0..self.shards).filter(|s| conv.interested & (1 << s) != 0) {
                out.push_local(
                    shard,
                    LocalMsg::Deliver {
                        conversation: conv.id.clone(),
                        frame: frame.clone(),
                        skip: Some(from),
                        droppable: true,
                    },
                );
            }
        }
        out.to_session(
            from,
            Encoded::of(&ServerFrame::reply(request_id, server_frame::Kind::Ack(pb::Ack {}))),
            true,
        );
        Ok(())
    }

    /// `GetReceipts`: every member's current watermarks, by user id, paged.
    fn receipts(
        &mut self,
        from: SessionRef,
        user: &Arc<str>,
        request_id: u64,
        req: &pb::GetReceipts,
        out: &mut Outgoing,
    ) -> Result<(), OpError> {
        let Some(conv) = load(&mut self.convs, &self.storage, &req.conversation_id)? else {
            return Err(OpError::not_found());
        };
        conv.require_member(user)?;
        let limit = match req.limit as usize {
            0 => MAX_RECEIPTS_PAGE,
            n => n.min(MAX_RECEIPTS_PAGE),
        };
        let mut users: Vec<&Arc<str>> =
            conv.members.keys().filter(|u| u.as_ref() > req.after.as_str()).collect();
        users.sort();
        let has_more = users.len() > limit;
        users.truncate(limit);
        let receipts: Vec<pb::Receipt> = users
            .iter()
            .filter_map(|u| {
                conv.members.get(*u).map(|m| pb::Receipt {
                    conversation_id: String::new(),
                    user_id: u.to_string(),
                    delivered_seq: m.delivered_seq,
                    read_seq: m.read_seq,
                })
            })
            .collect();
        let next_after = if has_more {
            users.last().map(ToString::to_string).unwrap_or_default()
        } else {
            String::new()
        };
        let list = pb::ReceiptList {
            conversation_id: conv.id.to_string(),
            receipts,
            has_more,
            next_after,
        };
        out.to_session(
            from,
            Encoded::of(&ServerFrame::reply(request_id, server_frame::Kind::Receipts(list))),
            true,
        );
        Ok(())
    }

    /// In a cluster: whether this node accepts writes for `conversation` now. When its
    /// partition's serving epoch changed since the cached state was validated, that state is
    /// reloaded first.
    fn check_serving(&mut self, conversation: &str, out: &mut Outgoing) -> Result<(), OpError> {
        let Some(routing) = &self.routing else { return Ok(()) };
        let p = super::partition(conversation);
        let Some(epoch) = routing.partitions.serving(p) else { return Err(routing.refuse(p)) };
        if self.fenced.contains(&p) {
            return Err(OpError::new(
                ErrorCode::Unavailable,
                "a write of this conversation failed; retry shortly",
            ));
        }
        if self.epochs.get(&p) != Some(&epoch) {
            self.reset_partition(p, out);
            self.epochs.insert(p, epoch);
        }
        Ok(())
    }

    /// A conversation as the store holds it now. Where this node does not serve the partition
    /// (a cluster's follower), the cached state is refreshed from the store, which replication
    /// keeps current.
    fn current(&mut self, id: &str) -> Result<Option<&mut Conv>, OpError> {
        let p = super::partition(id);
        let stale = self.routing.as_ref().is_some_and(|r| {
            r.partitions.serving(p).is_none_or(|e| self.epochs.get(&p) != Some(&e))
        });
        if stale && let Some(conv) = self.convs.get_mut(id) {
            match self.storage.load_conversation(p, id) {
                Ok(Some(l)) => conv.reload(l),
                Ok(None) => {
                    self.convs.remove(id);
                }
                Err(e) => return Err(OpError::storage(&e)),
            }
        }
        load(&mut self.convs, &self.storage, id)
    }

    /// The serving epoch of `p` changed, or a write of it failed: whatever waits on the old
    /// epoch is failed back (clients retry with their idempotency keys), the open batch is
    /// dropped, and the cached conversations are reloaded from the store.
    fn reset_partition(&mut self, p: u16, out: &mut Outgoing) {
        self.open.remove(&p);
        self.epochs.remove(&p);
        let ids: Vec<Arc<str>> =
            self.convs.values().filter(|c| c.partition == p).map(|c| c.id.clone()).collect();
        for id in ids {
            let Some(conv) = self.convs.get_mut(&id) else { continue };
            fail_waiting(conv, out);
            match self.storage.load_conversation(p, &id) {
                Ok(Some(l)) => conv.reload(l),
                Ok(None) | Err(_) => {
                    // Reloaded on next use (an error is reported then).
                    self.convs.remove(&id);
                }
            }
        }
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Closes the open batches: one for the storage writer on a single node; in a cluster, one
    /// replicated entry per partition and one local batch for the rest.
    pub fn take_batches(&mut self) -> Vec<Flush> {
        let dirty: Vec<(Arc<str>, Arc<str>)> =
            self.open.values_mut().flat_map(|b| std::mem::take(&mut b.dirty_members)).collect();
        for (conv, user) in dirty {
            let Some(c) = self.convs.get(&conv) else { continue };
            if let Some(m) = c.members.get(&user) {
                batch(&mut self.open, &self.epochs, c.partition).put_member(c, &user, m);
            }
        }
        let open = std::mem::take(&mut self.open);
        let local = std::mem::take(&mut self.local_ops);
        let mut out = Vec::new();
        if self.routing.is_none() {
            let (mut ops, mut effects) = (local, Vec::new());
            for b in open.into_values() {
                ops.extend(b.ops);
                effects.extend(b.effects);
            }
            if !ops.is_empty() {
                let token = self.token();
                self.inflight.insert(token, (effects, None));
                out.push(Flush::Local { token, ops });
            }
            return out;
        }
        if !local.is_empty() {
            let token = self.token();
            self.inflight.insert(token, (Vec::new(), None));
            out.push(Flush::Local { token, ops: local });
        }
        for (partition, b) in open {
            if b.ops.is_empty() {
                continue;
            }
            let token = self.token();
            self.inflight.insert(token, (b.effects, Some((partition, b.epoch))));
            *self.replicating.entry(partition).or_default() += 1;
            out.push(Flush::Replicate { token, partition, epoch: b.epoch, ops: b.ops });
        }
        out
    }

    /// A local batch is durable (or failed): run its effects in log order.
    pub fn on_committed(&mut self, c: Committed, out: &mut Outgoing) {
        let Some((effects, _)) = self.inflight.remove(&c.token) else {
            tracing::error!(token = c.token, "commit for no batch in flight");
            return;
        };
        let seqs = match c.result {
            Ok(seqs) => seqs,
            Err(e) => {
                tracing::error!(error = %e, "batch failed; refusing further writes");
                self.fail_all(out);
                return;
            }
        };
        if cfg!(debug_assertions) && self.storage.durability() == Durability::Sync {
            let durable = self.storage.durable_watermark();
            assert!(
                durable >= c.commit_no,
                "ack before fsync: commit {} > durable {durable}",
                c.commit_no
            );
        }
        self.run_effects(effects, seqs, out);
    }

    /// A replicated share is committed and applied here, or failed (cluster).
    pub fn on_replicated(
        &mut self,
        token: u64,
        outcome: crate::cluster::dataplane::Outcome,
        out: &mut Outgoing,
    ) {
        let Some((effects, part)) = self.inflight.remove(&token) else {
            tracing::error!(token, "replication outcome for no batch in flight");
            return;
        };
        let Some((p, epoch)) = part else { return };
        match outcome {
            crate::cluster::dataplane::Outcome::Applied(seqs) => {
                self.run_effects(effects, seqs, out);
            }
            // Failed in the epoch the partition is served in (the leader stepped down, or the
            // engine's queue was full): other shares of it may still commit, so the partition
            // is fenced until none is in flight. Failed in an older epoch: its waiters were
            // answered when the new epoch's state was loaded.
            crate::cluster::dataplane::Outcome::Failed => {
                if self.epochs.get(&p) == Some(&epoch) {
                    self.fenced.insert(p);
                }
            }
        }
        let left = self.replicating.get_mut(&p).map_or(0, |n| {
            *n = n.saturating_sub(1);
            *n
        });
        if left == 0 {
            self.replicating.remove(&p);
            if self.fenced.remove(&p) {
                self.reset_partition(p, out);
            }
        }
    }

    /// Runs a durable batch's effects in log order; `seqs` are its feed appends' user_seqs.
    fn run_effects(&mut self, effects: Vec<Effect>, seqs: Vec<u64>, out: &mut Outgoing) {
        let mut seqs = seqs.into_iter();
        let shards = self.shards;
        for effect in effects {
            match effect {
                Effect::Broadcast { conv, frame, skip } => {
                    let Some(c) = self.convs.get_mut(&conv) else { continue };
                    if self.routing.is_some() {
                        out.peers.push((conv.clone(), frame.clone(), false));
                        c.push_to_following(&frame, false, out);
                    }
                    for shard in (0..shards).filter(|s| c.interested & (1 << s) != 0) {
                        out.push_local(
                            shard,
                            LocalMsg::Deliver {
                                conversation: conv.clone(),
                                frame: frame.clone(),
                                skip,
                                droppable: false,
                            },
                        );
                    }
                }
                Effect::Entry { conv, seq, frame, skip, pending, revoke, notify } => {
                    let Some(c) = self.convs.get_mut(&conv) else { continue };
                    c.durable_seq = c.durable_seq.max(seq);
                    c.push_to_following(&frame, false, out);
                    let interested: Vec<usize> =
                        (0..shards).filter(|s| c.interested & (1 << s) != 0).collect();
                    for &shard in &interested {
                        out.push_local(
                            shard,
                            LocalMsg::Deliver {
                                conversation: conv.clone(),
                                frame: frame.clone(),
                                skip,
                                droppable: false,
                            },
                        );
                        for user in &revoke {
                            out.push_local(
                                shard,
                                LocalMsg::Revoke { conversation: conv.clone(), user: user.clone() },
                            );
                        }
                    }
                    if let Some(p) =
                        pending.and_then(|key| c.pending.remove(&key).map(|p| (key, p)))
                    {
                        let (key, p) = p;
                        out.stored += 1;
                        self.ack_latency.record(p.started.elapsed().as_secs_f64());
                        for (i, (to, request_id)) in p.waiters.into_iter().enumerate() {
                            out.to_session(
                                to,
                                ack_frame(request_id, &conv, p.seq, p.timestamp_ms, &key.1, i > 0),
                                true,
                            );
                        }
                    }
                    let durable = c.durable_seq;
                    c.waiting.retain(|(s, to, frame)| {
                        if *s <= durable {
                            out.to_session(*to, frame.clone(), true);
                            false
                        } else {
                            true
                        }
                    });
                    if let (Some(sender), Some(max)) = (notify, self.push_group_max)
                        && c.members.len() <= max
                    {
                        let others = c.members.keys().filter(|u| **u != sender).cloned();
                        for (_, users) in super::group_by_home(others, shards) {
                            let Some(first) = users.first().cloned() else { continue };
                            out.home.push((
                                first,
                                HomeMsg::Notify(Box::new(NotifyMsg {
                                    conversation: conv.clone(),
                                    name: c.record.name.clone(),
                                    kind: c.record.kind,
                                    seq,
                                    sender: sender.clone(),
                                    users,
                                })),
                            ));
                        }
                    }
                }
                Effect::Feed { user, mut event } => {
                    event.user_seq = seqs.next().unwrap_or(0);
                    if self.routing.is_some() && event.kind == FeedEventKind::Added as i32 {
                        let conversation = Arc::from(event.conversation_id.as_str());
                        out.follow.push((user.clone(), conversation));
                    }
                    feed_event(user, event, out);
                }
            }
        }
    }

    /// Moves local interest to where the conversation is now delivered from after this node
    /// gained or lost a complete copy of its partition (a move, a removal): sessions of a
    /// conversation it no longer holds follow it through its leader (from the last seq
    /// delivered here); those of a followed conversation it now holds get its replays.
    fn rehome_interest(&mut self) {
        let Some(routing) = &self.routing else { return };
        let lost: Vec<Arc<str>> = self
            .convs
            .values()
            .filter(|c| c.interested != 0 && !routing.holds(c.partition))
            .map(|c| c.id.clone())
            .collect();
        let gained: Vec<Arc<str>> =
            self.followed.keys().filter(|c| routing.holds(super::partition(c))).cloned().collect();
        for id in lost {
            let Some(c) = self.convs.get_mut(&id) else { continue };
            let f = self.followed.entry(id).or_default();
            if f.interested == 0 {
                f.last_seq = c.durable_seq;
            }
            f.interested |= std::mem::take(&mut c.interested);
        }
        for id in gained {
            let Some(f) = self.followed.remove(&id) else { continue };
            if let Ok(Some(c)) = self.current(&id) {
                c.interested |= f.interested;
            }
        }
    }

    /// (On the leader.) Records or renews another node's interest in a conversation: a
    /// registration names the user, who must be a member; a refresh gets the committed
    /// entries after `after_seq` back (up to [`super::interest::CATCH_UP`]).
    fn interest(
        &mut self,
        node: crate::cluster::NodeId,
        user: Option<Arc<str>>,
        conversation: &str,
        after_seq: u64,
        out: &mut Outgoing,
    ) -> super::interest::wire::ItemReply {
        use super::interest::wire::ItemReply;
        if self.poisoned || self.routing.is_none() || self.check_serving(conversation, out).is_err()
        {
            return ItemReply::default();
        }
        let storage = self.storage.clone();
        let c = match self.current(conversation) {
            Ok(Some(c)) => c,
            Ok(None) => return ItemReply { ok: true, ..ItemReply::default() },
            Err(_) => return ItemReply::default(),
        };
        let member = user.as_ref().is_none_or(|u| c.members.contains_key(u));
        let head = c.durable_seq;
        if !member {
            return ItemReply { ok: true, member, head, entries: Vec::new() };
        }
        c.nodes.insert(node, Instant::now());
        let mut entries = Vec::new();
        if user.is_none() && after_seq < head {
            let to = head.min(after_seq.saturating_add(super::interest::CATCH_UP as u64));
            let reader = storage.reader();
            for item in reader.entries(c.partition, conversation, after_seq + 1, to + 1, false) {
                match item {
                    Ok((_, entry)) => entries.push(entry.message),
                    Err(_) => return ItemReply::default(),
                }
            }
        }
        ItemReply { ok: true, member, head, entries }
    }

    /// (On a node that holds no copy.) Delivers a push from the leader of a followed
    /// conversation to the interested shards here: a message once, in seq order as far as it
    /// arrives so, revoking the subscriptions of members it removes.
    fn deliver_followed(
        &mut self,
        conversation: &Arc<str>,
        frame: &SharedFrame,
        droppable: bool,
        out: &mut Outgoing,
    ) {
        let Some(f) = self.followed.get_mut(conversation) else { return };
        let decoded = ServerFrame::decode(frame.payload()).ok();
        let mut revoke: Vec<Arc<str>> = Vec::new();
        if let Some(server_frame::Kind::Message(m)) = decoded.and_then(|d| d.kind) {
            // In order only: one that skips a seq waits for the next refresh's catch-up (a
            // message delivered past a missing removal would reach the removed member).
            if m.seq != f.last_seq + 1 {
                return;
            }
            f.last_seq = m.seq;
            revoke = removed_by(&m);
            if f.removed.len() >= super::interest::MAX_REMEMBERED_REMOVALS {
                f.removed.clear();
            }
            for user in &revoke {
                f.removed.insert(user.clone(), m.seq);
            }
        }
        deliver(out, self.shards, f.interested, conversation, frame, droppable, &revoke);
    }

    /// Committed entries applied here that another leader proposed (cluster: this node follows
    /// the partition, or adopted them): delivered to the local sessions that follow each
    /// conversation, in log order, with the revocations and feed events they imply.
    pub fn on_replayed(&mut self, r: crate::cluster::dataplane::Replayed, out: &mut Outgoing) {
        for raw in r.messages {
            let Ok(entry) = StoredEntry::decode(raw) else { continue };
            let Ok(msg) = pb::Message::decode(entry.message.clone()) else { continue };
            let Some(c) = self.convs.get_mut(msg.conversation_id.as_str()) else { continue };
            c.durable_seq = c.durable_seq.max(msg.seq);
            let revoke = removed_by(&msg);
            let frame = Encoded::new(encode_message_push(&entry.message));
            deliver(out, self.shards, c.interested, &c.id, &frame, false, &revoke);
        }
        for (user, event) in r.feeds {
            feed_event(user, event, out);
        }
    }

    /// After a storage failure: answer everything waiting with `unavailable`.
    fn fail_all(&mut self, out: &mut Outgoing) {
        self.poisoned = true;
        for c in self.convs.values_mut() {
            fail_waiting(c, out);
        }
        self.inflight.clear();
        self.replicating.clear();
        self.open.clear();
        self.local_ops.clear();
    }
}

/// A durable membership feed event, to the user's home shard.
fn feed_event(user: Arc<str>, event: pb::FeedEvent, out: &mut Outgoing) {
    let conversation: Arc<str> = Arc::from(event.conversation_id.as_str());
    let added = event.kind == FeedEventKind::Added as i32;
    let frame = Encoded::of(&ServerFrame::push(server_frame::Kind::FeedEvent(event)));
    let event = UserEvent { frame, conversation, added, silent: false };
    out.home.push((user.clone(), HomeMsg::UserEvent { user, event: Arc::new(event) }));
}

/// Answers every send and reply waiting on `conv` with `UNAVAILABLE` (retry).
fn fail_waiting(conv: &mut Conv, out: &mut Outgoing) {
    let err = |rid| {
        Encoded::of(&crate::shard::error_frame(
            rid,
            ErrorCode::Unavailable,
            "the write did not complete; retry with the same idempotency key",
        ))
    };
    for (_, p) in conv.pending.drain() {
        for (to, rid) in p.waiters {
            out.to_session(to, err(rid), true);
        }
    }
    for (_, to, frame) in conv.waiting.drain(..) {
        let rid = ServerFrame::decode(frame.payload()).map_or(0, |f| f.request_id);
        out.to_session(to, err(rid), true);
    }
}

/// The members a system entry removes (their subscriptions are revoked with it).
fn removed_by(msg: &pb::Message) -> Vec<Arc<str>> {
    match msg.system.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(system_event::Kind::MembersRemoved(m)) => {
            m.users.iter().map(|u| Arc::from(u.as_str())).collect()
        }
        Some(system_event::Kind::MemberLeft(m)) => vec![Arc::from(m.user.as_str())],
        _ => Vec::new(),
    }
}

/// Delivers `frame` to every shard whose bit is set in `interested`, then revokes `revoke`'s
/// subscriptions there.
fn deliver(
    out: &mut Outgoing,
    shards: usize,
    interested: u64,
    conversation: &Arc<str>,
    frame: &SharedFrame,
    droppable: bool,
    revoke: &[Arc<str>],
) {
    for shard in (0..shards).filter(|s| interested & (1 << s) != 0) {
        out.push_local(
            shard,
            LocalMsg::Deliver {
                conversation: conversation.clone(),
                frame: frame.clone(),
                skip: None,
                droppable,
            },
        );
        for user in revoke {
            out.push_local(
                shard,
                LocalMsg::Revoke { conversation: conversation.clone(), user: user.clone() },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::dataplane::{Outcome, Partitions};
    use crate::storage::{WriteBatch, WriterHandle};

    const ALICE: SessionRef = SessionRef { shard: 0, id: 1 };

    struct Fixture {
        owner: Owner,
        writer: WriterHandle,
        _dir: tempfile::TempDir,
    }

    /// An owner in a cluster whose engine serves every partition in epoch 1, with a real store.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.storage.data_dir = dir.path().to_owned();
        let storage = Storage::open(&config.storage).unwrap();
        let (writer, _join) = crate::storage::writer::spawn(storage.clone()).unwrap();
        let partitions = Arc::new(Partitions::default());
        for p in 0..1024 {
            partitions.set_serving(p, Some(1));
        }
        let view = crate::cluster::membership::View {
            self_id: 1,
            generation: 1,
            seeded: false,
            members: Vec::new(),
            removed: std::collections::BTreeSet::new(),
        };
        let gossip = tokio::sync::watch::channel(Arc::new(view)).1;
        let routed = Routed { partitions, gossip, control: None };
        let owner = Owner::new(0, 1, storage, &config, Some(routed));
        Fixture { owner, writer, _dir: dir }
    }

    impl Fixture {
        fn request(&mut self, op: OwnerOp) -> Outgoing {
            let mut out = Outgoing::new(1);
            let msg = OwnerMsg::Request {
                from: ALICE,
                user: Arc::from("alice"),
                request_id: 7,
                op,
                forwarded: false,
            };
            self.owner.handle(msg, &mut out);
            out
        }

        fn send(&mut self, key: &str) -> Outgoing {
            self.request(OwnerOp::Send(pb::Send {
                conversation_id: "c".into(),
                client_msg_id: key.into(),
                content: Some(pb::Content::text(key)),
            }))
        }

        /// Closes the open share of the conversation's partition: (token, ops).
        fn take(&mut self) -> (u64, Vec<WriteOp>) {
            match self.owner.take_batches().pop() {
                Some(Flush::Replicate { token, ops, .. }) => (token, ops),
                other => panic!("expected a replicated share, got {other:?}"),
            }
        }

        /// What the engine does once a share commits: apply it, then report it.
        fn apply(&mut self, token: u64, ops: Vec<WriteOp>) {
            let (tx, rx) = std::sync::mpsc::channel();
            let sink: crate::storage::CommitSink = Arc::new(move |c| {
                let _ = tx.send(c);
            });
            self.writer.submit(WriteBatch { token, ops, sink, fsync: false }).unwrap();
            let seqs = rx.recv().unwrap().result.unwrap();
            self.owner.on_replicated(token, Outcome::Applied(seqs), &mut Outgoing::new(1));
        }
    }

    impl Fixture {
        /// Alice's group `c`, committed and applied (seq 1).
        fn create(&mut self) {
            let request = pb::CreateConversation {
                kind: ConversationKind::Group as i32,
                ..Default::default()
            };
            self.request(OwnerOp::Create { conversation_id: Arc::from("c"), request });
            let (token, ops) = self.take();
            self.apply(token, ops);
        }
    }

    /// The seqs of the messages a share writes.
    fn seqs(ops: &[WriteOp]) -> Vec<u64> {
        ops.iter()
            .filter_map(|op| match op {
                WriteOp::Put(Ks::Messages, key, _) => keys::trailing_u64(key),
                _ => None,
            })
            .collect()
    }

    fn errors(out: &Outgoing) -> Vec<i32> {
        out.local
            .iter()
            .flatten()
            .filter_map(|m| match m {
                LocalMsg::Frame { frame, .. } => ServerFrame::decode(frame.payload()).ok(),
                _ => None,
            })
            .filter_map(|f| match f.kind {
                Some(server_frame::Kind::Error(e)) => Some(e.code),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn given_a_share_failed_while_another_is_in_flight_should_refuse_writes_until_it_completes_and_never_reuse_a_seq()
     {
        let mut f = fixture();
        f.create();

        f.send("m1");
        let (t1, ops1) = f.take();
        assert_eq!(seqs(&ops1), [2]);
        f.send("m2");
        let (t2, ops2) = f.take();
        assert_eq!(seqs(&ops2), [3]);
        // The second share fails (say the engine's queue was full) while the first may still
        // commit: writes wait, or they would reuse the first share's seq.
        f.owner.on_replicated(t2, Outcome::Failed, &mut Outgoing::new(1));
        assert_eq!(errors(&f.send("m3")), [ErrorCode::Unavailable as i32]);
        // The first share commits: the state is reloaded from the store, which holds it.
        f.apply(t1, ops1);
        assert!(errors(&f.send("m4")).is_empty());
        let (_, ops4) = f.take();
        assert_eq!(seqs(&ops4), [3], "the seq after the committed share, not a reused one");
    }

    #[test]
    fn given_a_failure_from_an_older_epoch_should_not_fence_the_partition() {
        let mut f = fixture();
        f.create();
        f.send("m1");
        let (t1, _) = f.take();
        // The node leads a newer epoch now (re-appointed); the old share fails late.
        let p = crate::shard::partition("c");
        f.owner.routing.as_ref().unwrap().partitions.set_serving(p, Some(2));
        let out = f.send("m2");
        // m1 waited on the old epoch: answered UNAVAILABLE (retried by key) when the new
        // epoch's state was loaded; m2 is accepted at the seq after what the store holds.
        assert_eq!(errors(&out), [ErrorCode::Unavailable as i32]);
        f.owner.on_replicated(t1, Outcome::Failed, &mut Outgoing::new(1));
        assert!(errors(&f.send("m3")).is_empty(), "not fenced by the old epoch's failure");
        let (_, ops) = f.take();
        assert_eq!(seqs(&ops), [2, 3]);
    }
}
