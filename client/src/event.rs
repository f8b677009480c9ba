//! Events delivered to the application and the stream that carries them.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use switchboard_protocol::{DisconnectReason, FeedEvent, Message, Presence, Receipt, TypingEvent};
use tokio::sync::mpsc;

/// Something that happened on the client's connection or in the user's conversations.
///
/// Per conversation, [`Event::Message`]s form the complete log in increasing `seq` order, each
/// entry exactly once, including the user's own sends (built from their acks) and system
/// entries. [`Event::Feed`]s arrive in `user_seq` order without gaps. Presence, typing and
/// receipt events are ephemeral: nothing is replayed after a reconnect except the presence of
/// the users subscribed to with [`Client::subscribe_presence`](crate::Client::subscribe_presence).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A connection was established and authenticated.
    Connected {
        /// The authenticated user.
        user_id: String,
        /// The broker's id for this connection (for logs and support).
        session_id: String,
        /// False for the first connection, true after a reconnect.
        reconnect: bool,
    },
    /// The next entry of a conversation's log (user message or system entry).
    Message(Message),
    /// The next entry of the user's membership feed (added to / removed from a conversation).
    Feed(FeedEvent),
    /// The local cursor of a conversation pointed beyond its log (e.g. the broker lost data or
    /// the conversation was recreated). Local state for it should be dropped; the log is
    /// delivered again from `first_seq`.
    CursorReset {
        /// The conversation.
        conversation_id: String,
        /// The first seq the user may read.
        first_seq: u64,
        /// The newest seq in the conversation.
        last_seq: u64,
    },
    /// A user's presence: a change pushed by the broker (for direct-conversation peers and
    /// subscribed users), or after a reconnect the current presence of every subscribed user.
    Presence(Presence),
    /// Another user started or stopped typing in a conversation. Show the indicator for at
    /// most `expires_in_ms` unless another event renews it. Events about the client's own
    /// user (typing on another device) are not emitted.
    Typing(TypingEvent),
    /// A member's delivered/read watermarks in a conversation advanced: another member's, or
    /// the user's own from another device (compare `user_id` with
    /// [`Client::user_id`](crate::Client::user_id)). The broker sends at most one per member
    /// and conversation per second.
    Receipt(Receipt),
    /// The user is no longer a member of the conversation; its cursor was dropped.
    Revoked {
        /// The conversation.
        conversation_id: String,
    },
    /// The connection dropped. Unless reconnecting is disabled or impossible, the client
    /// reconnects on its own and emits [`Event::Connected`] again.
    Disconnected {
        /// The reason the broker gave in its `Disconnect` frame, if it sent one.
        reason: Option<DisconnectReason>,
        /// A human-readable description.
        message: String,
    },
    /// The client stopped for good; this is the last event.
    Closed,
}

/// The stream of [`Event`]s of one [`Client`](crate::Client).
///
/// The channel is unbounded: the client never stalls its connection on a slow reader, so read
/// it promptly. It ends (yields `None`) after [`Event::Closed`].
#[derive(Debug)]
pub struct EventStream {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl EventStream {
    pub(crate) fn new(rx: mpsc::UnboundedReceiver<Event>) -> Self {
        Self { rx }
    }

    /// The next event, or `None` once the client has stopped and all events were read.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready now, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Stream for EventStream {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
