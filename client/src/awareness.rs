//! Receipts, typing and presence: the [`Client`] methods about who read what, who is typing
//! and who is online.

use std::sync::atomic::Ordering;

use futures::future::try_join_all;
use switchboard_protocol::{self as pb, client_frame, server_frame};

use crate::driver::DEFAULT_MAX_PRESENCE_USERS;
use crate::error::Result;
use crate::{Client, Presence, Receipt, ReceiptList, strings, unexpected};

impl Client {
    /// Marks everything up to `seq` in a conversation as read by the user (on all of their
    /// devices) and returns the user's watermarks now. Watermarks only move forward: a lower
    /// `seq` changes nothing. Reading implies delivery.
    ///
    /// Delivery needs no call: the client acknowledges it on its own (see
    /// [`ClientBuilder::auto_delivery_receipts`](crate::ClientBuilder::auto_delivery_receipts)).
    ///
    /// # Errors
    /// [`Error::Server`](crate::Error::Server) (`NOT_FOUND` for non-members, `RATE_LIMITED`),
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Closed`](crate::Error::Closed).
    pub async fn mark_read(&self, conversation_id: &str, seq: u64) -> Result<Receipt> {
        let mark = pb::MarkRead { conversation_id: conversation_id.to_owned(), seq };
        match self.request(client_frame::Kind::MarkRead(mark)).await? {
            server_frame::Kind::Receipt(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Tells the conversation's online members that the user started (`active`) or stopped
    /// typing. Repeat it every few seconds while typing goes on. Typing is ephemeral and
    /// rate-limited: updates are never retried, and a `RATE_LIMITED` error is normal and best
    /// ignored.
    ///
    /// # Errors
    /// [`Error::Server`](crate::Error::Server) (`RATE_LIMITED`, `NOT_FOUND`),
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Closed`](crate::Error::Closed).
    pub async fn typing(&self, conversation_id: &str, active: bool) -> Result<()> {
        let typing = pb::Typing { conversation_id: conversation_id.to_owned(), active };
        match self.request(client_frame::Kind::Typing(typing)).await? {
            server_frame::Kind::Ack(_) => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// The current presence of `users`, in the broker's order. More users than the broker's
    /// `max_presence_users` (default 500) are split into several requests.
    ///
    /// # Errors
    /// [`Error::Server`](crate::Error::Server) (e.g. `BAD_REQUEST` for an invalid id),
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Closed`](crate::Error::Closed).
    pub async fn presence(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Vec<Presence>> {
        let queries = self.presence_chunks(users).into_iter().map(|users| {
            self.presence_list(client_frame::Kind::PresenceQuery(pb::PresenceQuery { users }))
        });
        Ok(try_join_all(queries).await?.into_iter().flatten().collect())
    }

    /// Subscribes to the presence of `users` and returns their current presence; changes then
    /// arrive as [`Event::Presence`](crate::Event::Presence). Direct-conversation peers need no
    /// subscription. Split into several requests like [`Client::presence`].
    ///
    /// The broker ends subscriptions with the connection; the client remembers the users of
    /// every subscription it sent (unless the broker rejected it, or they were unsubscribed
    /// since) and renews them after every reconnect, after the resume sync, emitting their
    /// presence then as `Event::Presence`. A call made while disconnected fails with
    /// `ConnectionLost` and is not remembered.
    ///
    /// # Errors
    /// See [`Client::presence`]; also `LIMIT_EXCEEDED` beyond the broker's
    /// `max_presence_subscriptions`. When one of several requests fails the others may have
    /// taken effect.
    pub async fn subscribe_presence(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Vec<Presence>> {
        let requests = self.presence_chunks(users).into_iter().map(|users| {
            let subscribe = pb::PresenceSubscribe { users };
            self.presence_list(client_frame::Kind::PresenceSubscribe(subscribe))
        });
        Ok(try_join_all(requests).await?.into_iter().flatten().collect())
    }

    /// Ends the presence subscriptions of `users` (the client forgets them at once, so they
    /// are not renewed after a reconnect). While disconnected there is nothing to end on the
    /// broker's side, and the call succeeds.
    ///
    /// # Errors
    /// [`Error::Server`](crate::Error::Server),
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Closed`](crate::Error::Closed).
    pub async fn unsubscribe_presence(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<()> {
        let requests = self.presence_chunks(users).into_iter().map(|users| async move {
            let unsubscribe = pb::PresenceUnsubscribe { users };
            match self.request(client_frame::Kind::PresenceUnsubscribe(unsubscribe)).await? {
                server_frame::Kind::Ack(_) => Ok(()),
                other => Err(unexpected(&other)),
            }
        });
        try_join_all(requests).await?;
        Ok(())
    }

    /// One page of every member's watermarks in a conversation, ordered by user id, starting
    /// after `after` (the previous page's `next_after`). `limit` 0 means the broker's maximum.
    /// With these, "read by 7 of 10" for a message counts the members other than its sender
    /// whose `read_seq` is at least the message's seq.
    ///
    /// # Errors
    /// [`Error::Server`](crate::Error::Server) (`NOT_FOUND` for non-members),
    /// [`Error::ConnectionLost`](crate::Error::ConnectionLost),
    /// [`Error::Closed`](crate::Error::Closed).
    pub async fn receipts(
        &self,
        conversation_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ReceiptList> {
        let get = pb::GetReceipts {
            conversation_id: conversation_id.to_owned(),
            limit,
            after: after.unwrap_or_default().to_owned(),
        };
        match self.request(client_frame::Kind::GetReceipts(get)).await? {
            server_frame::Kind::Receipts(list) => Ok(list),
            other => Err(unexpected(&other)),
        }
    }

    /// `users` in chunks of the broker's `max_presence_users`; none when `users` is empty.
    fn presence_chunks(
        &self,
        users: impl IntoIterator<Item = impl Into<String>>,
    ) -> Vec<Vec<String>> {
        let max = match self.inner.max_presence_users.load(Ordering::Relaxed) {
            0 => DEFAULT_MAX_PRESENCE_USERS,
            n => n,
        };
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let mut users = strings(users).into_iter().peekable();
        let mut chunks = Vec::new();
        while users.peek().is_some() {
            chunks.push(users.by_ref().take(max).collect());
        }
        chunks
    }

    async fn presence_list(&self, kind: client_frame::Kind) -> Result<Vec<Presence>> {
        match self.request(kind).await? {
            server_frame::Kind::Presences(list) => Ok(list.presences),
            other => Err(unexpected(&other)),
        }
    }
}
