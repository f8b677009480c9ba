//! One file per request. Requests that change a conversation are validated here and routed to
//! the conversation's owner; reads run on a blocking thread against the durable snapshot and
//! are authorized against it.

pub mod conversation;
pub mod hello;
pub mod history;
pub mod list;
pub mod presence;
pub mod receipts;
pub mod refresh;
pub mod send;
pub mod sync;
pub mod typing;
pub mod userread;

use std::rc::Rc;

use switchboard_protocol::{
    ClientFrame, Encoded, ErrorCode, ServerFrame, client_frame, server_frame,
    validate::ValidationError,
};

use crate::config::LimitsConfig;
use crate::shard::ReadAt;
use crate::shard::local::LocalSession;
use crate::shard::mailbox::{Forward, ReadOp, Remote};
use crate::shard::owner::now_ms;
use crate::shard::{OwnerMsg, OwnerOp, SessionRef, Shard};
use crate::storage::{Reader, StorageError};

/// Everything a handler needs.
pub struct Ctx<'a> {
    /// The hosting shard.
    pub shard: &'a Rc<Shard>,
    /// The authenticated session.
    pub session: &'a Rc<LocalSession>,
    /// Its global address.
    pub me: SessionRef,
}

/// A request failure to send back.
#[derive(Debug)]
pub struct Reject {
    /// The code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
}

impl Reject {
    /// A rejection.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }

    /// The disk is below its free-space floor: writes wait until space returns.
    #[must_use]
    pub fn storage_full() -> Self {
        Self::new(
            ErrorCode::StorageFull,
            "the broker's disk is nearly full; writes are refused until space is freed",
        )
    }

    /// Not found or not a member (indistinguishable on purpose).
    #[must_use]
    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "conversation not found")
    }
}

impl From<ValidationError> for Reject {
    fn from(e: ValidationError) -> Self {
        let code = match e {
            ValidationError::TooLong {
                field: switchboard_protocol::validate::Field::Body, ..
            } => ErrorCode::TooLarge,
            _ => ErrorCode::BadRequest,
        };
        Self::new(code, e.to_string())
    }
}

impl From<StorageError> for Reject {
    fn from(e: StorageError) -> Self {
        let (code, message) = e.report();
        Self::new(code, message)
    }
}

impl Ctx<'_> {
    /// Refuses a write while the disk is below its free-space floor.
    ///
    /// # Errors
    /// `STORAGE_FULL`.
    pub fn writable(&self) -> Result<(), Reject> {
        if self.shard.storage.is_full() { Err(Reject::storage_full()) } else { Ok(()) }
    }

    /// Queues a reply frame.
    pub fn reply(&self, request_id: u64, kind: server_frame::Kind) {
        self.session.send(&ServerFrame::reply(request_id, kind));
    }

    /// Queues an error reply.
    pub fn reject(&self, request_id: u64, r: Reject) {
        self.session.send(&crate::shard::error_frame(request_id, r.code, r.message));
    }

    /// Routes an operation to the owner of `conversation`; the owner answers.
    pub fn to_owner(&self, conversation: &str, request_id: u64, op: OwnerOp) {
        self.session.request_started();
        self.shard.to_owner(
            conversation,
            OwnerMsg::Request {
                from: self.me,
                user: self.session.user.clone(),
                request_id,
                op,
                forwarded: false,
            },
        );
    }

    /// Serves a read of one conversation: from this node's store when it holds a readable
    /// copy (always, single node), else by the partition's leader, through the peer port.
    pub fn read_conversation(&self, request_id: u64, op: ReadOp) {
        if let Err(r) = op.validate() {
            self.reject(request_id, r);
            return;
        }
        match self.shard.read_at(crate::shard::partition(op.conversation())) {
            ReadAt::Here => {
                let user = self.session.user.clone();
                let limits = self.shard.config.limits.clone();
                self.read(request_id, move |r| op.run(r, &user, &limits));
            }
            ReadAt::Node(leader) => {
                self.session.request_started();
                let user = self.session.user.clone();
                let op = Remote::Read(op);
                self.shard.forward(leader, Forward { from: self.me, user, request_id, op });
            }
            ReadAt::Nowhere => self.reject(
                request_id,
                Reject::new(ErrorCode::Unavailable, "the conversation is moving; retry shortly"),
            ),
        }
    }

    /// Runs a read over the user's conversations (here, and on other nodes for partitions
    /// this one holds no copy of: [`userread`]) and replies with `kind` of its answer.
    pub fn user_read(
        &self,
        request_id: u64,
        read: userread::UserRead,
        kind: fn(userread::UserReadReply) -> Option<server_frame::Kind>,
    ) {
        self.session.request_started();
        let shard = self.shard.clone();
        let session = self.session.clone();
        tokio::task::spawn_local(async move {
            let user = session.user.clone();
            let frame = match userread::gather(&shard, user, read).await.map(kind) {
                Ok(Some(kind)) => ServerFrame::reply(request_id, kind),
                Ok(None) => {
                    crate::shard::error_frame(request_id, ErrorCode::Internal, "internal error")
                }
                Err(r) => crate::shard::error_frame(request_id, r.code, r.message),
            };
            session.out.push(Encoded::of(&frame));
            session.request_done();
        });
    }

    /// Runs `read` on a blocking thread against the durable snapshot, then sends its result
    /// (or its rejection) as the reply. Counts as in flight until then.
    pub fn read<F>(&self, request_id: u64, read: F)
    where
        F: FnOnce(&Reader) -> Result<server_frame::Kind, Reject> + Send + 'static,
    {
        self.session.request_started();
        let storage = self.shard.storage.clone();
        let session = self.session.clone();
        tokio::task::spawn_local(async move {
            let result = tokio::task::spawn_blocking(move || read(&storage.reader())).await;
            let frame = match result {
                Ok(Ok(kind)) => ServerFrame::reply(request_id, kind),
                Ok(Err(r)) => crate::shard::error_frame(request_id, r.code, r.message),
                Err(e) => {
                    tracing::error!(error = %e, "read task failed");
                    crate::shard::error_frame(request_id, ErrorCode::Internal, "internal error")
                }
            };
            session.out.push(Encoded::of(&frame));
            session.request_done();
        });
    }
}

impl ReadOp {
    /// Checks the request's fields.
    ///
    /// # Errors
    /// The first invalid field.
    pub fn validate(&self) -> Result<(), Reject> {
        match self {
            Self::History(r) => {
                Ok(switchboard_protocol::validate::conversation_id(&r.conversation_id)?)
            }
            Self::ListMembers(r) => list::check_members(r),
        }
    }

    /// Reads the reply from `r`, for `user` (members only).
    ///
    /// # Errors
    /// `not_found` for non-members, or a storage failure.
    pub fn run(
        self,
        r: &Reader,
        user: &str,
        limits: &LimitsConfig,
    ) -> Result<server_frame::Kind, Reject> {
        match self {
            Self::History(req) => history::read(r, user, &req, limits),
            Self::ListMembers(req) => list::read_members(r, user, req),
        }
    }
}

/// Handles one request of an authenticated session.
pub fn dispatch(shard: &Rc<Shard>, session: &Rc<LocalSession>, me: SessionRef, frame: ClientFrame) {
    let ctx = Ctx { shard, session, me };
    let rid = frame.request_id;
    let Some(kind) = frame.kind else {
        ctx.reject(rid, Reject::new(ErrorCode::Unsupported, "unknown request type"));
        return;
    };
    match kind {
        client_frame::Kind::Hello(_) => {
            ctx.reject(rid, Reject::new(ErrorCode::BadRequest, "already authenticated"));
        }
        client_frame::Kind::Ping(_) => {
            ctx.reply(
                rid,
                server_frame::Kind::Pong(switchboard_protocol::Pong { server_time_ms: now_ms() }),
            );
        }
        client_frame::Kind::Send(req) => send::handle(&ctx, rid, req),
        client_frame::Kind::CreateConversation(req) => conversation::create(&ctx, rid, req),
        client_frame::Kind::AddMembers(req) => conversation::add_members(&ctx, rid, req),
        client_frame::Kind::RemoveMembers(req) => conversation::remove_members(&ctx, rid, req),
        client_frame::Kind::Leave(req) => conversation::leave(&ctx, rid, req),
        client_frame::Kind::History(req) => history::handle(&ctx, rid, req),
        client_frame::Kind::Sync(req) => sync::handle(&ctx, rid, req),
        client_frame::Kind::ListConversations(req) => list::conversations(&ctx, rid, req),
        client_frame::Kind::ListMembers(req) => list::members(&ctx, rid, req),
        client_frame::Kind::MarkRead(req) => receipts::mark_read(&ctx, rid, req),
        client_frame::Kind::MarkDelivered(req) => receipts::mark_delivered(&ctx, rid, req),
        client_frame::Kind::GetReceipts(req) => receipts::get_receipts(&ctx, rid, req),
        client_frame::Kind::Typing(req) => typing::handle(&ctx, rid, req),
        client_frame::Kind::PresenceQuery(req) => presence::query(&ctx, rid, req),
        client_frame::Kind::PresenceSubscribe(req) => presence::subscribe(&ctx, rid, req),
        client_frame::Kind::PresenceUnsubscribe(req) => presence::unsubscribe(&ctx, rid, req),
        client_frame::Kind::RefreshToken(req) => refresh::handle(&ctx, rid, &req),
    }
}

/// Room left in a reply frame for everything but its repeated entries.
pub(crate) const REPLY_OVERHEAD: usize = 4 * 1024;
