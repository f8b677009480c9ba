//! What the driver queues and what it remembers about requests in flight.

use switchboard_protocol::{client_frame, server_frame};

use super::Reply;

/// The reply kind a request expects.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    Pong,
    History,
    Conversation,
    Membership,
    Conversations,
    Members,
    Receipt,
    Receipts,
    Presences,
    Ack,
    RefreshTokenOk,
    Any,
}

impl Expect {
    pub(super) fn of(kind: &client_frame::Kind) -> Self {
        use client_frame::Kind as K;
        match kind {
            K::Ping(_) => Expect::Pong,
            K::History(_) => Expect::History,
            K::CreateConversation(_) => Expect::Conversation,
            K::AddMembers(_) | K::RemoveMembers(_) | K::Leave(_) => Expect::Membership,
            K::ListConversations(_) => Expect::Conversations,
            K::ListMembers(_) => Expect::Members,
            K::MarkRead(_) | K::MarkDelivered(_) => Expect::Receipt,
            K::GetReceipts(_) => Expect::Receipts,
            K::PresenceQuery(_) | K::PresenceSubscribe(_) => Expect::Presences,
            K::Typing(_) | K::PresenceUnsubscribe(_) => Expect::Ack,
            K::RefreshToken(_) => Expect::RefreshTokenOk,
            K::Hello(_) | K::Send(_) | K::Sync(_) => Expect::Any,
        }
    }

    pub(super) fn fits(self, kind: &server_frame::Kind) -> bool {
        use server_frame::Kind as K;
        matches!(
            (self, kind),
            (Expect::Pong, K::Pong(_))
                | (Expect::History, K::History(_))
                | (Expect::Conversation, K::Conversation(_))
                | (Expect::Membership, K::Membership(_))
                | (Expect::Conversations, K::Conversations(_))
                | (Expect::Members, K::Members(_))
                | (Expect::Receipt, K::Receipt(_))
                | (Expect::Receipts, K::Receipts(_))
                | (Expect::Presences, K::Presences(_))
                | (Expect::Ack, K::Ack(_))
                | (Expect::RefreshTokenOk, K::RefreshTokenOk(_))
                | (Expect::Any, _)
        )
    }
}

/// Why the driver sent a request of its own; its reply never reaches the application.
#[derive(Debug, Clone, Copy)]
pub(super) enum Internal {
    /// An automatic `MarkDelivered`.
    Delivered,
    /// A `PresenceSubscribe` renewing the subscriptions after a reconnect.
    Resubscribe,
}

/// A frame waiting for a free in-flight slot.
pub(super) enum Outbound {
    Request {
        kind: client_frame::Kind,
        reply: Reply<server_frame::Kind>,
    },
    /// The key of an entry of [`Driver::sends`](super::Driver).
    Send(u64),
    Sync,
    Ping,
    Internal {
        kind: client_frame::Kind,
        purpose: Internal,
    },
}

/// A request written and not answered yet.
pub(super) enum Pending {
    Request {
        expect: Expect,
        reply: Reply<server_frame::Kind>,
        /// For a `PresenceSubscribe`: its users, forgotten again if the broker rejects it.
        subscribed: Vec<String>,
    },
    Send(u64),
    Sync,
    Ping,
    Internal(Internal),
}

impl Pending {
    /// The bookkeeping of an application request about to be written.
    pub(super) fn request(kind: &client_frame::Kind, reply: Reply<server_frame::Kind>) -> Self {
        let subscribed = match kind {
            client_frame::Kind::PresenceSubscribe(s) => s.users.clone(),
            _ => Vec::new(),
        };
        Pending::Request { expect: Expect::of(kind), reply, subscribed }
    }
}
