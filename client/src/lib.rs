//! # Switchboard client
//!
//! An async client for the Switchboard chat broker. One [`Client`] owns one connection, kept
//! alive by a background Tokio task that
//!
//! - matches replies to requests and sends heartbeats,
//! - delivers every conversation's log as [`Event`]s in `seq` order, each entry exactly once
//!   (including the user's own sends), syncing whenever it notices a gap,
//! - reconnects with full-jitter exponential backoff, resumes from the last position and
//!   re-sends unanswered messages with their original `client_msg_id` (the broker
//!   deduplicates them), so nothing is lost or duplicated across a reconnect,
//! - acknowledges delivery of what it hands to the application and renews presence
//!   subscriptions after a reconnect.
//!
//! ```no_run
//! use switchboard_client::{Client, Content, Event};
//!
//! # async fn demo() -> Result<(), switchboard_client::Error> {
//! let (client, mut events) = Client::builder("127.0.0.1:7400").token("<jwt>").connect().await?;
//! let dm = client.create_direct("bob").await?;
//! client.send(&dm.conversation_id, Content::text("hi bob")).await?;
//! while let Some(event) = events.next().await {
//!     if let Event::Message(m) = event {
//!         let text = m.content.as_ref().and_then(|c| c.as_text()).unwrap_or("<binary>");
//!         println!("{} #{}: {text}", m.sender, m.seq);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## Receipts, typing and presence
//! - **Delivered**: the client sends `MarkDelivered` on its own for the highest seq of each
//!   conversation it emitted as [`Event::Message`], at most once per 500 ms per conversation
//!   and only while connected; turn it off with [`ClientBuilder::auto_delivery_receipts`].
//! - **Read**: call [`Client::mark_read`] with the last seq the user has seen; other members
//!   (and the user's other devices) receive [`Event::Receipt`]. [`Client::receipts`] pages
//!   through every member's watermarks.
//! - **Typing**: [`Client::typing`] while the user types; others receive [`Event::Typing`]
//!   (never about the client's own user). Typing updates are rate-limited and never retried.
//! - **Presence**: [`Client::presence`] asks once; [`Client::subscribe_presence`] also
//!   delivers changes as [`Event::Presence`] (direct-conversation peers' presence arrives
//!   without subscribing). The broker ends subscriptions with the connection; the client
//!   renews them after every reconnect and emits the users' current presence then.
//!
//! ```no_run
//! use switchboard_client::{Client, Event};
//!
//! # async fn demo(client: Client, mut events: switchboard_client::EventStream)
//! # -> Result<(), switchboard_client::Error> {
//! client.subscribe_presence(["bob", "carol"]).await?;
//! while let Some(event) = events.next().await {
//!     match event {
//!         // Marking every message is simplest; coalescing (the last of a batch) is cheaper.
//!         Event::Message(m) => {
//!             client.mark_read(&m.conversation_id, m.seq).await?;
//!         }
//!         Event::Typing(t) if t.active => println!("{} is typing", t.user_id),
//!         Event::Receipt(r) => println!("{} read up to #{}", r.user_id, r.read_seq),
//!         Event::Presence(p) => println!("{} online: {}", p.user_id, p.online),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! ## Requests while disconnected
//! [`Client::send`] and [`Client::send_with_id`] wait: the message is sent once the client has
//! reconnected and resumed, and the call returns its ack. All other requests fail fast with
//! [`Error::ConnectionLost`], as do requests that were in flight when the connection dropped
//! (a send in flight is instead re-sent with the same key), except
//! [`Client::unsubscribe_presence`], which succeeds (the broker already ended the
//! subscriptions).
//!
//! ## Rate limits
//! A send the broker rejects with `RATE_LIMITED` was not stored; [`Client::send`] waits the
//! `retry_after_ms` the broker asked for (at least 50 ms) and retries with the same
//! `client_msg_id`, up to [`ClientBuilder::send_rate_limit_retries`] times (default 3). Other
//! requests return the error ([`Error::Server`] carries `retry_after_ms`).
//!
//! ## Persisting the position
//! [`Client::position`] is the position after every event emitted so far (possibly not yet
//! read from the [`EventStream`]); pass it to [`ClientBuilder::resume_from`] to continue later.
//! When a conversation is left or revoked its cursor is dropped, and if the user is added again
//! its readable log is delivered again from the start.

mod awareness;
mod backoff;
mod builder;
mod delivery;
mod driver;
mod error;
mod event;
mod handshake;
mod state;

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use switchboard_protocol::{self as pb, client_frame, server_frame};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

pub use backoff::ReconnectPolicy;
pub use builder::ClientBuilder;
pub use error::{BoxError, Error, Result};
pub use event::{Event, EventStream};
/// The wire protocol crate, for the types not re-exported here.
pub use switchboard_protocol as protocol;
pub use switchboard_protocol::{
    Content, Conversation, ConversationKind, ConversationList, ConversationSummary, Cursor,
    DisconnectReason, ErrorCode, FeedEvent, FeedEventKind, HistoryPage, HistoryVisibility, Member,
    MemberList, MembershipResult, Message, Presence, Receipt, ReceiptList, Role, SendAck,
    SyncPosition, SystemEvent, TypingEvent,
};

use driver::Command;
use state::SyncState;

/// Which page of a conversation's log [`Client::history`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryAnchor {
    /// The newest entries.
    Latest,
    /// The newest entries with `seq` below this one.
    Before(u64),
    /// The oldest entries with `seq` above this one.
    After(u64),
}

/// A handle to a Switchboard connection. Cheap to clone; all clones share the connection,
/// which stops when [`Client::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// The least wait before retrying a rate-limited send.
const MIN_SEND_RETRY: Duration = Duration::from_millis(50);

/// What the clones of a [`Client`] share.
pub(crate) struct Inner {
    pub(crate) cmds: mpsc::UnboundedSender<Command>,
    pub(crate) state: Arc<Mutex<SyncState>>,
    /// `Limits.max_presence_users` of the current connection (kept up to date by the driver).
    pub(crate) max_presence_users: Arc<AtomicU32>,
    pub(crate) user_id: String,
    pub(crate) send_rate_limit_retries: u32,
    /// The static token Hello uses (none with a token provider); a refresh replaces it.
    pub(crate) static_token: Option<Arc<std::sync::Mutex<String>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("user_id", &self.inner.user_id).finish_non_exhaustive()
    }
}

fn strings(items: impl IntoIterator<Item = impl Into<String>>) -> Vec<String> {
    items.into_iter().map(Into::into).collect()
}

fn unexpected(kind: &server_frame::Kind) -> Error {
    Error::Protocol(format!("unexpected reply {kind:?}"))
}

impl Client {
    /// Options for a client of the broker at `addr` (`host:port`).
    pub fn builder(addr: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(addr.into())
    }

    pub(crate) fn new(inner: Inner) -> Self {
        Self { inner: Arc::new(inner) }
    }

    /// The authenticated user's id.
    #[must_use]
    pub fn user_id(&self) -> &str {
        &self.inner.user_id
    }

    /// The current position (feed position and per-conversation cursors), to persist and
    /// resume from with [`ClientBuilder::resume_from`].
    #[must_use]
    pub fn position(&self) -> SyncPosition {
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner).position()
    }

    fn command(&self, cmd: Command) -> Result<()> {
        self.inner.cmds.send(cmd).map_err(|_| Error::Closed)
    }

    async fn request(&self, kind: client_frame::Kind) -> Result<server_frame::Kind> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Request { kind, reply })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Creates (or returns the existing) direct conversation with `other`.
    ///
    /// # Errors
    /// [`Error::Server`] (e.g. `BAD_REQUEST`), [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn create_direct(&self, other: &str) -> Result<Conversation> {
        self.create(pb::CreateConversation {
            kind: ConversationKind::Direct as i32,
            members: vec![other.to_owned()],
            ..pb::CreateConversation::default()
        })
        .await
    }

    /// Creates a group with a server-generated id; the caller becomes its admin.
    ///
    /// # Errors
    /// See [`Client::create_direct`]; also `LIMIT_EXCEEDED` for too many members.
    pub async fn create_group(
        &self,
        name: &str,
        members: impl IntoIterator<Item = impl Into<String>>,
        visibility: HistoryVisibility,
    ) -> Result<Conversation> {
        self.create_group_with_id("", name, members, visibility).await
    }

    /// Creates a group with a client-chosen id, so that retrying the create is idempotent
    /// (the existing group is returned with `created == false`).
    ///
    /// # Errors
    /// See [`Client::create_group`]; also `ALREADY_EXISTS` when the id is taken by a
    /// conversation the caller is not a member of.
    pub async fn create_group_with_id(
        &self,
        conversation_id: &str,
        name: &str,
        members: impl IntoIterator<Item = impl Into<String>>,
        visibility: HistoryVisibility,
    ) -> Result<Conversation> {
        self.create(pb::CreateConversation {
            kind: ConversationKind::Group as i32,
            name: name.to_owned(),
            members: strings(members),
            visibility: visibility as i32,
            conversation_id: conversation_id.to_owned(),
        })
        .await
    }

    async fn create(&self, create: pb::CreateConversation) -> Result<Conversation> {
        match self.request(client_frame::Kind::CreateConversation(create)).await? {
            server_frame::Kind::Conversation(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Adds users to a group (admins only).
    ///
    /// # Errors
    /// [`Error::Server`] (`FORBIDDEN`, `NOT_FOUND`, `LIMIT_EXCEEDED`, ...),
    /// [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn add_members(
        &self,
        conversation_id: &str,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<MembershipResult> {
        let add =
            pb::AddMembers { conversation_id: conversation_id.to_owned(), users: strings(users) };
        self.membership(client_frame::Kind::AddMembers(add)).await
    }

    /// Removes users from a group (admins only).
    ///
    /// # Errors
    /// See [`Client::add_members`].
    pub async fn remove_members(
        &self,
        conversation_id: &str,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<MembershipResult> {
        let remove = pb::RemoveMembers {
            conversation_id: conversation_id.to_owned(),
            users: strings(users),
        };
        self.membership(client_frame::Kind::RemoveMembers(remove)).await
    }

    /// Leaves a conversation.
    ///
    /// # Errors
    /// See [`Client::add_members`].
    pub async fn leave(&self, conversation_id: &str) -> Result<MembershipResult> {
        let leave = pb::Leave { conversation_id: conversation_id.to_owned() };
        self.membership(client_frame::Kind::Leave(leave)).await
    }

    async fn membership(&self, kind: client_frame::Kind) -> Result<MembershipResult> {
        match self.request(kind).await? {
            server_frame::Kind::Membership(m) => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of the caller's conversations, ordered by id, starting after `after` (the
    /// previous page's `next_after`). `limit` 0 means the broker's maximum.
    ///
    /// # Errors
    /// [`Error::Server`], [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn list_conversations(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ConversationList> {
        let list = pb::ListConversations { limit, after: after.unwrap_or_default().to_owned() };
        match self.request(client_frame::Kind::ListConversations(list)).await? {
            server_frame::Kind::Conversations(l) => Ok(l),
            other => Err(unexpected(&other)),
        }
    }

    /// One page of a conversation's members, ordered by user id, starting after `after`.
    /// `limit` 0 means the broker's maximum.
    ///
    /// # Errors
    /// [`Error::Server`] (`NOT_FOUND` for non-members), [`Error::ConnectionLost`],
    /// [`Error::Closed`].
    pub async fn list_members(
        &self,
        conversation_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<MemberList> {
        let list = pb::ListMembers {
            conversation_id: conversation_id.to_owned(),
            limit,
            after: after.unwrap_or_default().to_owned(),
        };
        match self.request(client_frame::Kind::ListMembers(list)).await? {
            server_frame::Kind::Members(l) => Ok(l),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a message with a fresh random `client_msg_id` (32 hex digits).
    ///
    /// If the connection drops before the ack, the message is re-sent with the same id after
    /// reconnecting and the call returns the (deduplicated) ack. While disconnected the call
    /// waits for the reconnect. The message also appears in the event stream, in order.
    ///
    /// The broker limits how fast a user sends; a rejected message was not stored. The call
    /// then waits the broker's `retry_after_ms` (at least 50 ms) and sends it again with the
    /// same `client_msg_id`, up to [`ClientBuilder::send_rate_limit_retries`] times (default
    /// 3) before returning the `RATE_LIMITED` error. Messages sent meanwhile by other tasks
    /// may be stored before a retried one.
    ///
    /// # Errors
    /// [`Error::Server`] (e.g. `NOT_FOUND`, `TOO_LARGE`, `RATE_LIMITED` once the retries are
    /// used up), [`Error::Frame`] when the frame exceeds the broker's limit, [`Error::Closed`]
    /// when the client closes first, [`Error::ConnectionLost`] when the connection drops and
    /// reconnecting is disabled.
    pub async fn send(&self, conversation_id: &str, content: Content) -> Result<SendAck> {
        let key: [u8; 16] = rand::random();
        let client_msg_id: String = key.iter().map(|b| format!("{b:02x}")).collect();
        self.send_with_id(conversation_id, client_msg_id, content).await
    }

    /// Sends a message with an application-chosen idempotency key. Repeating a key in the same
    /// conversation returns the original ack (`duplicate == true`) and stores nothing.
    /// Rate-limited sends are retried as described for [`Client::send`].
    ///
    /// # Errors
    /// See [`Client::send`].
    pub async fn send_with_id(
        &self,
        conversation_id: &str,
        client_msg_id: impl Into<String>,
        content: Content,
    ) -> Result<SendAck> {
        let send = pb::Send {
            conversation_id: conversation_id.to_owned(),
            client_msg_id: client_msg_id.into(),
            content: Some(content),
        };
        let mut retries_left = self.inner.send_rate_limit_retries;
        loop {
            let (reply, rx) = oneshot::channel();
            self.command(Command::Send { send: send.clone(), reply })?;
            match rx.await.map_err(|_| Error::Closed)? {
                Err(Error::Server { code: ErrorCode::RateLimited, retry_after_ms, .. })
                    if retries_left > 0 =>
                {
                    retries_left -= 1;
                    let wait = Duration::from_millis(retry_after_ms).max(MIN_SEND_RETRY);
                    debug!(?wait, key = %send.client_msg_id, "send rate limited; retrying");
                    tokio::time::sleep(wait).await;
                }
                outcome => return outcome,
            }
        }
    }

    /// A page of a conversation's log (this does not move the client's cursor).
    /// `limit` 0 means the broker's maximum.
    ///
    /// # Errors
    /// [`Error::Server`], [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn history(
        &self,
        conversation_id: &str,
        anchor: HistoryAnchor,
        limit: u32,
    ) -> Result<HistoryPage> {
        let anchor = match anchor {
            HistoryAnchor::Latest => None,
            HistoryAnchor::Before(seq) => Some(pb::history::Anchor::BeforeSeq(seq)),
            HistoryAnchor::After(seq) => Some(pb::history::Anchor::AfterSeq(seq)),
        };
        let history = pb::History { conversation_id: conversation_id.to_owned(), anchor, limit };
        match self.request(client_frame::Kind::History(history)).await? {
            server_frame::Kind::History(page) => Ok(page),
            other => Err(unexpected(&other)),
        }
    }

    /// Runs a full sync pass (one that starts after this call) and returns when it completed
    /// and its events were emitted.
    ///
    /// # Errors
    /// [`Error::Server`] when a sync request failed (the client retries on its own),
    /// [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn sync_now(&self) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.command(Command::Sync { reply })?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Replaces the session's token before it expires (`RefreshToken`) and returns the new
    /// token's expiry (ms since the epoch). The broker verifies it like the first one and
    /// requires the same user; until it accepts, the session keeps its old token, and a session
    /// whose token expires is closed ([`Event::Disconnected`] with
    /// [`DisconnectReason::TokenExpired`](switchboard_protocol::DisconnectReason::TokenExpired)).
    /// With a static token ([`ClientBuilder::token`]), an accepted token is also the one
    /// reconnects use from then on.
    ///
    /// # Errors
    /// [`Error::Server`]: `UNAUTHENTICATED` or `TOKEN_EXPIRED` for a rejected token and
    /// `FORBIDDEN` for another user's, each with its [`Error::reason`] (e.g. `expired`,
    /// `bad_signature`, `subject_mismatch`); [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn refresh_token(&self, token: impl Into<String>) -> Result<u64> {
        let token = token.into();
        let req = pb::RefreshToken { token: token.clone() };
        match self.request(client_frame::Kind::RefreshToken(req)).await? {
            server_frame::Kind::RefreshTokenOk(ok) => {
                if let Some(t) = &self.inner.static_token {
                    *t.lock().unwrap_or_else(PoisonError::into_inner) = token;
                }
                Ok(ok.expires_at_ms)
            }
            other => Err(unexpected(&other)),
        }
    }

    /// Pings the broker and returns the round-trip time.
    ///
    /// # Errors
    /// [`Error::ConnectionLost`], [`Error::Closed`].
    pub async fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        match self.request(client_frame::Kind::Ping(pb::Ping {})).await? {
            server_frame::Kind::Pong(_) => Ok(start.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection and stops the background task; returns after
    /// [`Event::Closed`] was emitted. Unanswered requests (including sends) fail with
    /// [`Error::Closed`]. Closing twice is harmless.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.command(Command::Close { done }).is_ok() {
            let _ = rx.await;
        }
    }
}
