//! Frames from the broker: pushes, replies to the application's requests and to the
//! driver's own.

use std::time::Duration;

use switchboard_protocol::{DisconnectReason, ErrorCode, ServerFrame, server_frame};
use tracing::{debug, warn};

use super::requests::{Internal, Pending};
use super::{Driver, Link, Lost, Stop};
use crate::error::Error;
use crate::event::Event;

impl Driver {
    pub(super) fn on_frame(&mut self, link: &mut Link, frame: ServerFrame) -> Result<(), Stop> {
        use server_frame::Kind as K;
        let ServerFrame { request_id, kind } = frame;
        let Some(kind) = kind else {
            // A frame type this client does not know (a newer broker): fail its request.
            if let Some(pending) = link.pending.remove(&request_id) {
                self.reject(link, pending, || Error::Protocol("unknown reply type".into()));
            }
            return Ok(());
        };
        match kind {
            K::Disconnect(d) => Err(Stop::Lost(Lost {
                reason: Some(DisconnectReason::try_from(d.reason).unwrap_or_default()),
                message: d.message,
                retry_after: Duration::from_millis(d.retry_after_ms),
            })),
            K::Message(m) if request_id == 0 => {
                let events = self.lock().apply_message(m);
                self.emit_all(events);
                Ok(())
            }
            K::FeedEvent(f) if request_id == 0 => {
                let events = self.lock().apply_feed_event(f);
                self.emit_all(events);
                Ok(())
            }
            K::Presence(p) if request_id == 0 => {
                self.emit(Event::Presence(p));
                Ok(())
            }
            // The user's other devices typing are not news to this one.
            K::Typing(t) if request_id == 0 => {
                if t.user_id != self.user_id {
                    self.emit(Event::Typing(t));
                }
                Ok(())
            }
            K::ReceiptEvent(r) if request_id == 0 => {
                if r.user_id == self.user_id {
                    self.delivery.confirmed(&r.conversation_id, r.delivered_seq);
                }
                self.emit(Event::Receipt(r));
                Ok(())
            }
            K::Error(e) if request_id == 0 => {
                let message = e.message;
                warn!(code = e.code, %message, "connection-level error from the broker");
                Ok(())
            }
            _ if request_id == 0 => Err(Stop::violation("a reply without request id")),
            kind => match link.pending.remove(&request_id) {
                Some(pending) => self.on_reply(link, pending, kind),
                None => Err(Stop::violation(format!("a reply to unknown request {request_id}"))),
            },
        }
    }

    fn on_reply(
        &mut self,
        link: &mut Link,
        pending: Pending,
        kind: server_frame::Kind,
    ) -> Result<(), Stop> {
        use server_frame::Kind as K;
        match (pending, kind) {
            (Pending::Ping, K::Pong(_)) => link.ping_outstanding = false,
            (Pending::Ping, K::Error(e)) => {
                link.ping_outstanding = false;
                warn!(code = e.code, message = %e.message, "heartbeat ping failed");
            }
            (Pending::Sync, K::Sync(page)) => self.on_sync_page(link, page),
            (Pending::Sync, K::Error(e)) => {
                warn!(code = e.code, message = %e.message, "sync failed; retrying");
                self.fail_pass(link, e.retry_after_ms, || Error::from_wire(e.clone()));
            }
            (Pending::Send(key), K::SendAck(ack)) => {
                if let Some((send, reply)) = self.sends.remove(&key) {
                    let events = self.lock().apply_own_ack(&self.user_id, &send, &ack);
                    self.emit_all(events);
                    let _ = reply.send(Ok(ack));
                }
            }
            (Pending::Send(key), K::Error(e)) => {
                if let Some((_, reply)) = self.sends.remove(&key) {
                    let _ = reply.send(Err(Error::from_wire(e)));
                }
            }
            (Pending::Request { reply, subscribed, .. }, K::Error(e)) => {
                self.forget_subscriptions(&subscribed);
                let _ = reply.send(Err(Error::from_wire(e)));
            }
            (Pending::Request { expect, reply, .. }, kind) if expect.fits(&kind) => {
                self.observe(&kind);
                let _ = reply.send(Ok(kind));
            }
            (Pending::Internal(purpose), kind) => return self.on_internal_reply(purpose, kind),
            (pending, _) => {
                self.reject(link, pending, || Error::Protocol("unexpected reply type".into()));
                return Err(Stop::violation("a reply of the wrong type"));
            }
        }
        Ok(())
    }

    /// The reply to a request of the driver's own: consumed here, errors are only logged.
    fn on_internal_reply(
        &mut self,
        purpose: Internal,
        kind: server_frame::Kind,
    ) -> Result<(), Stop> {
        use server_frame::Kind as K;
        match (purpose, kind) {
            (Internal::Delivered, K::Receipt(r)) => {
                self.delivery.confirmed(&r.conversation_id, r.delivered_seq);
            }
            (Internal::Resubscribe, K::Presences(list)) => {
                for presence in list.presences {
                    self.emit(Event::Presence(presence));
                }
            }
            (purpose, K::Error(e)) => {
                let error = Error::from_wire(e);
                if let (Internal::Delivered, Some(ErrorCode::Unsupported)) = (purpose, error.code())
                {
                    debug!("the broker does not support delivery receipts");
                    self.delivery.suspend();
                }
                debug!(?purpose, %error, "automatic request failed; ignored");
            }
            (purpose, kind) => {
                return Err(Stop::violation(format!("a reply to {purpose:?} of type {kind:?}")));
            }
        }
        Ok(())
    }

    /// Replies that reveal log entries this session may not be pushed make the state sync;
    /// receipts confirm delivered watermarks.
    fn observe(&mut self, kind: &server_frame::Kind) {
        match kind {
            server_frame::Kind::Receipt(r) => {
                self.delivery.confirmed(&r.conversation_id, r.delivered_seq);
            }
            server_frame::Kind::Conversation(c) => {
                self.lock().expect_seq(&c.conversation_id, c.last_seq);
            }
            server_frame::Kind::Membership(m) if m.seq > 0 => {
                self.lock().expect_seq(&m.conversation_id, m.seq);
            }
            _ => {}
        }
    }
}
