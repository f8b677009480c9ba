//! Typed mailbox messages and the per-target sender that never blocks the loop.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;

use switchboard_protocol::SharedFrame;
use tokio::sync::{mpsc, oneshot};

use super::SessionRef;
use crate::storage::Committed;

/// Everything a shard's mailbox carries.
#[derive(Debug)]
pub enum ShardMsg {
    /// For the partition-owner role.
    Owner(OwnerMsg),
    /// For the home-shard role.
    Home(HomeMsg),
    /// For local sessions: an ordered bundle from one shard.
    Local(Vec<LocalMsg>),
    /// From the storage writer: a batch of this shard's is durable (or failed).
    Committed(Committed),
    /// From the replication engine or the storage writer (cluster mode): what became of a
    /// replicated share of one of this shard's batches.
    Replicated {
        /// The batch's token.
        token: u64,
        /// Applied (with its feed appends' user_seqs) or failed.
        outcome: crate::cluster::dataplane::Outcome,
    },
    /// From the storage writer (cluster mode): committed entries of a partition this shard
    /// owns, applied here but proposed elsewhere, to deliver to local sessions.
    Replayed(Box<crate::cluster::dataplane::Replayed>),
    /// A request another node forwarded (cluster): handled by this shard's owner role; the
    /// reply frame goes back through `reply`.
    Forwarded {
        /// The forwarded request.
        request: Forward,
        /// Where its reply goes.
        reply: oneshot::Sender<SharedFrame>,
    },
    /// A question or an order from the admin API.
    Admin(crate::net::admin::AdminMsg),
    /// Begin a graceful shutdown; answer when drained.
    Shutdown(oneshot::Sender<()>),
    /// Second phase of a shutdown, once every shard drained: write what home messages
    /// processed since then changed (push queue, last seen), answer when durable.
    FinalFlush(oneshot::Sender<()>),
    /// Leave the loop.
    Exit,
}

/// A read of one conversation, served from the store of a node that holds a copy of its
/// partition (in a cluster, another node when this one holds none).
#[derive(Debug)]
pub enum ReadOp {
    /// A page of the log.
    History(switchboard_protocol::History),
    /// A page of the member list.
    ListMembers(switchboard_protocol::ListMembers),
}

impl ReadOp {
    /// The conversation read.
    #[must_use]
    pub fn conversation(&self) -> &str {
        match self {
            Self::History(r) => &r.conversation_id,
            Self::ListMembers(r) => &r.conversation_id,
        }
    }
}

/// A request forwarded to the node that leads its conversation: a write (or anything the
/// owner decides), or a read this node cannot serve.
#[derive(Debug)]
pub enum Remote {
    /// For the leader's owner role.
    Owner(OwnerOp),
    /// For the leader's store.
    Read(ReadOp),
}

impl Remote {
    /// The request as a client frame kind, and its conversation (resolved, for a create).
    #[must_use]
    pub fn into_kind(self) -> (switchboard_protocol::client_frame::Kind, String) {
        use switchboard_protocol::client_frame::Kind;
        match self {
            Self::Owner(op) => op.into_kind(),
            Self::Read(op) => {
                let conversation = op.conversation().to_owned();
                let kind = match op {
                    ReadOp::History(r) => Kind::History(r),
                    ReadOp::ListMembers(r) => Kind::ListMembers(r),
                };
                (kind, conversation)
            }
        }
    }

    /// The inverse of [`Remote::into_kind`]; `None` for a kind that is never forwarded.
    #[must_use]
    pub fn from_kind(
        kind: switchboard_protocol::client_frame::Kind,
        conversation: &str,
    ) -> Option<Self> {
        use switchboard_protocol::client_frame::Kind;
        Some(match kind {
            Kind::History(r) => Self::Read(ReadOp::History(r)),
            Kind::ListMembers(r) => Self::Read(ReadOp::ListMembers(r)),
            kind => Self::Owner(OwnerOp::from_kind(kind, conversation)?),
        })
    }
}

/// An operation on a conversation, decided by its owner.
#[derive(Debug)]
pub enum OwnerOp {
    /// Append a user message.
    Send(switchboard_protocol::Send),
    /// Create a conversation whose id the session already resolved.
    Create {
        /// The resolved id (deterministic for direct, chosen or generated for groups).
        conversation_id: Arc<str>,
        /// The request.
        request: switchboard_protocol::CreateConversation,
    },
    /// Add members (admins only).
    AddMembers(switchboard_protocol::AddMembers),
    /// Remove members (admins only).
    RemoveMembers(switchboard_protocol::RemoveMembers),
    /// Remove members of a group on an operator's behalf (the admin API): no membership
    /// check. Never forwarded between nodes: the admin API relays it to the leader's node.
    ForceRemove(switchboard_protocol::RemoveMembers),
    /// Leave a group.
    Leave(switchboard_protocol::Leave),
    /// Advance the read (and delivered) watermark.
    MarkRead(switchboard_protocol::MarkRead),
    /// Advance the delivered watermark.
    MarkDelivered(switchboard_protocol::MarkDelivered),
    /// A typing indicator.
    Typing(switchboard_protocol::Typing),
    /// Every member's watermarks.
    GetReceipts(switchboard_protocol::GetReceipts),
}

impl OwnerOp {
    /// Whether it adds to the store (refused below the free-space floor): a message, a
    /// conversation, members.
    #[must_use]
    pub fn grows(&self) -> bool {
        matches!(self, Self::Send(_) | Self::Create { .. } | Self::AddMembers(_))
    }

    /// The request as a client frame kind, and the conversation (resolved, for a create), for
    /// forwarding to another node.
    #[must_use]
    pub fn into_kind(self) -> (switchboard_protocol::client_frame::Kind, String) {
        use switchboard_protocol::client_frame::Kind;
        let conversation = self.conversation().to_owned();
        let kind = match self {
            Self::Send(r) => Kind::Send(r),
            Self::Create { request, .. } => Kind::CreateConversation(request),
            Self::AddMembers(r) => Kind::AddMembers(r),
            // A forwarded force-removal would be checked as the (empty) operator's own removal
            // and refused; the admin API never forwards one.
            Self::RemoveMembers(r) | Self::ForceRemove(r) => Kind::RemoveMembers(r),
            Self::Leave(r) => Kind::Leave(r),
            Self::MarkRead(r) => Kind::MarkRead(r),
            Self::MarkDelivered(r) => Kind::MarkDelivered(r),
            Self::Typing(r) => Kind::Typing(r),
            Self::GetReceipts(r) => Kind::GetReceipts(r),
        };
        (kind, conversation)
    }

    /// The inverse of [`OwnerOp::into_kind`]; `None` for a kind no owner handles.
    #[must_use]
    pub fn from_kind(
        kind: switchboard_protocol::client_frame::Kind,
        conversation: &str,
    ) -> Option<Self> {
        use switchboard_protocol::client_frame::Kind;
        Some(match kind {
            Kind::Send(r) => Self::Send(r),
            Kind::CreateConversation(request) => {
                Self::Create { conversation_id: Arc::from(conversation), request }
            }
            Kind::AddMembers(r) => Self::AddMembers(r),
            Kind::RemoveMembers(r) => Self::RemoveMembers(r),
            Kind::Leave(r) => Self::Leave(r),
            Kind::MarkRead(r) => Self::MarkRead(r),
            Kind::MarkDelivered(r) => Self::MarkDelivered(r),
            Kind::Typing(r) => Self::Typing(r),
            Kind::GetReceipts(r) => Self::GetReceipts(r),
            _ => return None,
        })
    }

    /// The conversation the operation is about.
    #[must_use]
    pub fn conversation(&self) -> &str {
        match self {
            Self::Send(r) => &r.conversation_id,
            Self::Create { conversation_id, .. } => conversation_id,
            Self::AddMembers(r) => &r.conversation_id,
            Self::RemoveMembers(r) | Self::ForceRemove(r) => &r.conversation_id,
            Self::Leave(r) => &r.conversation_id,
            Self::MarkRead(r) => &r.conversation_id,
            Self::MarkDelivered(r) => &r.conversation_id,
            Self::Typing(r) => &r.conversation_id,
            Self::GetReceipts(r) => &r.conversation_id,
        }
    }
}

/// Messages for a partition owner.
#[derive(Debug)]
pub enum OwnerMsg {
    /// A client request. The reply goes back to `from` in the owner's FIFO bundle.
    Request {
        /// The requesting session.
        from: SessionRef,
        /// The authenticated user.
        user: Arc<str>,
        /// Echoed in the reply.
        request_id: u64,
        /// What to do.
        op: OwnerOp,
        /// Forwarded by another node (cluster): never forwarded again.
        forwarded: bool,
    },
    /// A session shard asks to receive `conversations` for `sessions` of `user`. The owner
    /// answers with `LocalMsg::Subscribed`, per conversation whether the user is a member, in
    /// its FIFO bundle to that shard (so the answer is ordered with deliveries and
    /// revocations); for each member it adds `shard` to the conversation's interested shards.
    Subscribe {
        /// The asking shard.
        shard: usize,
        /// Whose sessions.
        user: Arc<str>,
        /// The sessions, on the asking shard.
        sessions: Vec<u64>,
        /// Which conversations.
        conversations: Vec<Arc<str>>,
        /// Echoed in the answer.
        token: u64,
    },
    /// A push the conversation's leader on another node sent (typing, receipts): for the
    /// local sessions that follow the conversation (cluster).
    Deliver {
        /// The conversation.
        conversation: Arc<str>,
        /// The push.
        frame: SharedFrame,
        /// Dropped for a slow session instead of queued (typing).
        droppable: bool,
    },
    /// `shard` has no session left interested in `conversation`.
    Unsubscribe {
        /// The shard.
        shard: usize,
        /// The conversation.
        conversation: Arc<str>,
    },
    /// (On a conversation's leader.) Another node registers or renews its interest
    /// ([`super::interest`]).
    Interest {
        /// The node.
        node: crate::cluster::NodeId,
        /// A registration: the user whose sessions subscribe (must be a member).
        user: Option<Arc<str>>,
        /// The conversation.
        conversation: Arc<str>,
        /// A refresh: entries after this seq are sent back.
        after_seq: u64,
        /// The answer.
        reply: oneshot::Sender<super::interest::wire::ItemReply>,
    },
    /// (On a node that holds no copy.) Sessions of `shard` subscribe to conversations whose
    /// leaders answered their registrations: each with its committed head, or `None` when the
    /// user is not a member. Answered like `Subscribe`.
    SubscribeFollowed {
        /// The asking shard.
        shard: usize,
        /// Whose sessions.
        user: Arc<str>,
        /// The sessions, on the asking shard.
        sessions: Vec<u64>,
        /// Conversations and heads.
        conversations: Vec<(Arc<str>, Option<u64>)>,
        /// Echoed in the answer.
        token: u64,
    },
    /// (On a node that holds no copy.) A refresh's catch-up: the encoded messages after the
    /// last seq delivered here.
    CaughtUp {
        /// The conversation.
        conversation: Arc<str>,
        /// The encoded `Message`s, ascending.
        entries: super::interest::Entries,
    },
}

/// Messages for a user's home shard.
#[derive(Debug)]
pub enum HomeMsg {
    /// A session of `user` started; `ack` answers whether it is registered (false: the user
    /// has the maximum number of sessions).
    SessionUp {
        /// The user.
        user: Arc<str>,
        /// The session.
        session: SessionRef,
        /// Fired when decided.
        ack: oneshot::Sender<bool>,
    },
    /// A session of `user` ended.
    SessionDown {
        /// The user.
        user: Arc<str>,
        /// The session.
        session: SessionRef,
    },
    /// A durable membership change of `user`: forward to every session of theirs.
    UserEvent {
        /// The user.
        user: Arc<str>,
        /// The feed event.
        event: Arc<UserEvent>,
    },
    /// These users still have sessions on the sending shard (lease renewal, batched).
    Renew {
        /// Users homed on the receiving shard.
        users: Vec<Arc<str>>,
    },
    /// Current presence of `users`; `None` where this shard has no record.
    PresenceQuery {
        /// Users homed on the receiving shard.
        users: Vec<Arc<str>>,
        /// One answer per user.
        reply: oneshot::Sender<Vec<Option<switchboard_protocol::Presence>>>,
    },
    /// `session` wants presence pushes for `users`; answered like a query.
    PresenceSubscribe {
        /// The subscribing session.
        session: SessionRef,
        /// Users homed on the receiving shard.
        users: Vec<Arc<str>>,
        /// One answer per user.
        reply: oneshot::Sender<Vec<Option<switchboard_protocol::Presence>>>,
    },
    /// `session` no longer wants presence pushes for `users`.
    PresenceUnsubscribe {
        /// The session.
        session: SessionRef,
        /// Users homed on the receiving shard.
        users: Vec<Arc<str>>,
    },
    /// A presence change for these users' sessions (they are the changed user's direct peers).
    PresenceNotify {
        /// Users homed on the receiving shard.
        users: Vec<Arc<str>>,
        /// The encoded `presence` push.
        frame: SharedFrame,
    },
    /// A durable message: queue push notifications for those of `users` with no session.
    Notify(Box<NotifyMsg>),
    /// (Cluster) A presence batch from another node: its part about users homed here.
    Presence(Box<crate::cluster::presence::Incoming>),
    /// (Cluster) A presence change of `user`, for this shard's users who have them as a
    /// direct peer.
    PeerPresence {
        /// The user whose presence changed.
        user: Arc<str>,
        /// The encoded `presence` push.
        frame: SharedFrame,
    },
    /// `user` read `conversation` up to `read_seq`: cancel a pending notification it covers.
    Read {
        /// The user.
        user: Arc<str>,
        /// The conversation.
        conversation: Arc<str>,
        /// The new read watermark.
        read_seq: u64,
    },
}

/// A message that may need push notifications.
#[derive(Debug)]
pub struct NotifyMsg {
    /// The conversation.
    pub conversation: Arc<str>,
    /// Its name (groups).
    pub name: String,
    /// Its kind (`ConversationKind`).
    pub kind: i32,
    /// The message's seq.
    pub seq: u64,
    /// The sender.
    pub sender: Arc<str>,
    /// Members other than the sender, all homed on the receiving shard.
    pub users: Vec<Arc<str>>,
}

/// A membership feed event ready for delivery.
#[derive(Debug)]
pub struct UserEvent {
    /// The encoded `FeedEvent` push frame.
    pub frame: SharedFrame,
    /// The conversation it is about.
    pub conversation: Arc<str>,
    /// Added (subscribe the sessions) or removed (unsubscribe them).
    pub added: bool,
    /// Only subscribe, without pushing `frame`: the user was added to a conversation whose
    /// partition this node holds no copy of, so its feed here has no such event
    /// (`super::interest`).
    pub silent: bool,
}

/// Messages for the shard hosting sessions. Delivered in order within a bundle.
#[derive(Debug)]
pub enum LocalMsg {
    /// A reply or ack for one session; `completes` releases one in-flight request slot.
    Frame {
        /// The session's id on this shard.
        session: u64,
        /// The encoded frame.
        frame: SharedFrame,
        /// Whether this answers a request.
        completes: bool,
    },
    /// A conversation entry for every interested session here except `skip`.
    Deliver {
        /// The conversation.
        conversation: Arc<str>,
        /// The shared encoded push frame.
        frame: SharedFrame,
        /// The sending session, which gets an ack instead.
        skip: Option<SessionRef>,
        /// Ephemeral (typing): dropped rather than queued when a queue is under pressure.
        droppable: bool,
    },
    /// A frame for some sessions here (presence).
    Push {
        /// Session ids on this shard.
        sessions: Vec<u64>,
        /// The encoded frame.
        frame: SharedFrame,
        /// Dropped rather than queued under pressure.
        droppable: bool,
    },
    /// The owner's answer to `OwnerMsg::Subscribe`.
    Subscribed {
        /// The request's token.
        token: u64,
        /// The sessions.
        sessions: Vec<u64>,
        /// The conversations asked about.
        conversations: Vec<Arc<str>>,
        /// One outcome per conversation.
        outcomes: Vec<Membership>,
    },
    /// `user` is no longer a member: stop delivering `conversation` to their sessions.
    Revoke {
        /// The conversation.
        conversation: Arc<str>,
        /// The removed user.
        user: Arc<str>,
    },
    /// A membership change for these sessions (from their user's home shard).
    UserEvent {
        /// Session ids on this shard.
        sessions: Vec<u64>,
        /// The user.
        user: Arc<str>,
        /// The event.
        event: Arc<UserEvent>,
    },
}

/// Whether a user is a member of a conversation, as its owner decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A member: deliveries follow.
    Member,
    /// Not a member (or no such conversation).
    NotMember,
    /// The owner could not tell (storage failed).
    Unavailable,
}

/// What a role produced while handling a message: routed by `Shard::dispatch`.
#[derive(Debug)]
pub struct Outgoing {
    /// Per target shard, an ordered bundle.
    pub local: Vec<Vec<LocalMsg>>,
    /// Messages for home shards, keyed by user.
    pub home: Vec<(Arc<str>, HomeMsg)>,
    /// Messages for home shards, by shard index.
    pub home_at: Vec<(usize, HomeMsg)>,
    /// Messages for owner shards, by shard index.
    pub owner: Vec<(usize, OwnerMsg)>,
    /// The open write batch grew: flush it soon.
    pub flush: bool,
    /// User messages made durable (for the metrics).
    pub stored: u64,
    /// Requests for the node that leads their conversation (cluster).
    pub forward: Vec<(crate::cluster::NodeId, Forward)>,
    /// Pushes for the sessions on the other nodes replicating the conversation (cluster):
    /// (conversation, frame, droppable).
    pub peers: Vec<(Arc<str>, SharedFrame, bool)>,
    /// Presence reports, snapshots and changes for other nodes (cluster), by node.
    pub presence: Vec<(crate::cluster::NodeId, crate::cluster::presence::Out)>,
    /// Pushes for nodes that registered interest in the conversation (cluster):
    /// (nodes, conversation, frame, droppable).
    pub nodes: Vec<(Vec<crate::cluster::NodeId>, Arc<str>, SharedFrame, bool)>,
    /// Followed conversations to refresh with their leaders: (conversation, last seq).
    pub refresh: Vec<(Arc<str>, u64)>,
    /// Users added to a conversation, for the nodes without a copy of it (user, conversation).
    pub follow: Vec<(Arc<str>, Arc<str>)>,
}

/// A request to forward to the node that leads its conversation.
#[derive(Debug)]
pub struct Forward {
    /// The requesting session (here).
    pub from: SessionRef,
    /// The authenticated user.
    pub user: Arc<str>,
    /// Echoed in the reply.
    pub request_id: u64,
    /// What to do.
    pub op: Remote,
}

impl Outgoing {
    /// Empty, for `shards` shards.
    #[must_use]
    pub fn new(shards: usize) -> Self {
        Self {
            local: (0..shards).map(|_| Vec::new()).collect(),
            home: Vec::new(),
            home_at: Vec::new(),
            owner: Vec::new(),
            flush: false,
            stored: 0,
            forward: Vec::new(),
            peers: Vec::new(),
            presence: Vec::new(),
            nodes: Vec::new(),
            refresh: Vec::new(),
            follow: Vec::new(),
        }
    }

    /// Queues a frame for one session.
    pub fn to_session(&mut self, to: SessionRef, frame: SharedFrame, completes: bool) {
        self.push_local(to.shard, LocalMsg::Frame { session: to.id, frame, completes });
    }

    /// Queues a message for a shard's local sessions.
    pub fn push_local(&mut self, shard: usize, msg: LocalMsg) {
        if let Some(bundle) = self.local.get_mut(shard) {
            bundle.push(msg);
        }
    }
}

/// The sending side of another shard's mailbox, with an overflow queue so the caller never
/// waits. Order is kept: once anything is queued in overflow, new messages queue behind it.
pub(crate) struct Peer {
    tx: mpsc::Sender<ShardMsg>,
    overflow: Rc<RefCell<VecDeque<ShardMsg>>>,
    forwarding: Rc<Cell<bool>>,
}

impl ShardMsg {
    /// Whether losing this message loses nothing that matters (typing indicators).
    fn is_droppable(&self) -> bool {
        match self {
            Self::Local(bundle) => bundle.iter().all(|m| {
                matches!(
                    m,
                    LocalMsg::Deliver { droppable: true, .. }
                        | LocalMsg::Push { droppable: true, .. }
                )
            }),
            _ => false,
        }
    }
}

impl Peer {
    pub(crate) fn new(tx: mpsc::Sender<ShardMsg>) -> Self {
        Self { tx, overflow: Rc::default(), forwarding: Rc::default() }
    }

    /// Messages waiting in the target's mailbox, plus this sender's overflow queue.
    pub(crate) fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity() + self.overflow.borrow().len()
    }

    pub(crate) fn send(&self, msg: ShardMsg) {
        // Under pressure ephemeral messages go first: never queued behind a full mailbox.
        if msg.is_droppable() && !self.overflow.borrow().is_empty() {
            return;
        }
        let msg = if self.overflow.borrow().is_empty() {
            match self.tx.try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(msg)) if !msg.is_droppable() => msg,
                Err(mpsc::error::TrySendError::Full(_)) => return,
            }
        } else {
            msg
        };
        self.overflow.borrow_mut().push_back(msg);
        if !self.forwarding.replace(true) {
            let tx = self.tx.clone();
            let overflow = self.overflow.clone();
            let forwarding = self.forwarding.clone();
            tokio::task::spawn_local(async move {
                loop {
                    let Ok(permit) = tx.reserve().await else {
                        overflow.borrow_mut().clear();
                        break;
                    };
                    let next = overflow.borrow_mut().pop_front();
                    match next {
                        Some(msg) => permit.send(msg),
                        None => break,
                    }
                }
                forwarding.set(false);
            });
        }
    }
}
