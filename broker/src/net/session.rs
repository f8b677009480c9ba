//! A client session, independent of the transport: the handshake, the read deadline, request
//! dispatch and the close protocol. A transport (TCP today) feeds it decoded frames and drains
//! its outbound queue.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use tokio::time::Instant;

use switchboard_protocol::{
    ClientFrame, DisconnectReason, ErrorCode, FrameError, ServerFrame, client_frame,
};
use tokio_util::sync::CancellationToken;

use super::handler;
use crate::metrics::{ConnectionGauge, Transport};
use crate::shard::local::{LocalSession, close_session};
use crate::shard::outbound::Outbound;
use crate::shard::{SessionRef, Shard};

/// A token this close to its deadline when the read timer fires counts as expired.
const TOKEN_SLACK: Duration = Duration::from_millis(100);

/// What the transport should do after a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Stop reading; the outbound queue already holds the final frames.
    Close,
}

/// The transport-independent part of a connection.
pub struct Session {
    /// The shard hosting it.
    pub shard: Rc<Shard>,
    /// The outbound queue the transport's writer drains.
    pub out: Rc<Outbound>,
    /// Cancelled when the broker or the queue closes the connection.
    pub cancel: CancellationToken,
    /// The peer, for logs.
    pub peer: SocketAddr,
    /// The transport it arrived over.
    pub transport: Transport,
    active: RefCell<Option<Rc<LocalSession>>>,
    span: tracing::Span,
    _gauge: ConnectionGauge,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("peer", &self.peer).finish_non_exhaustive()
    }
}

impl Session {
    /// A new, unauthenticated session on `shard`.
    #[must_use]
    pub fn new(shard: Rc<Shard>, peer: SocketAddr, transport: Transport) -> Self {
        let cancel = shard.cancel.child_token();
        let out = Rc::new(Outbound::new(shard.config.limits.outbound_queue_bytes, cancel.clone()));
        let span = tracing::debug_span!(
            "conn",
            %peer,
            transport = transport.label(),
            shard = shard.id,
            user = tracing::field::Empty
        );
        let gauge = ConnectionGauge::open(transport);
        Self {
            shard,
            out,
            cancel,
            peer,
            transport,
            active: RefCell::new(None),
            span,
            _gauge: gauge,
        }
    }

    /// The tracing span of this connection.
    #[must_use]
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Until when the transport may wait for the next frame, from `now`: the idle timeout
    /// after Hello, but never past the session's token deadline (one timer serves both); the
    /// handshake timeout before.
    #[must_use]
    pub fn read_deadline(&self, now: Instant) -> Instant {
        let s = &self.shard.config.server;
        match &*self.active.borrow() {
            Some(a) => {
                let idle = now + Duration::from_millis(s.idle_timeout_ms);
                a.token_deadline().map_or(idle, |token| token.min(idle))
            }
            None => now + Duration::from_millis(s.hello_timeout_ms),
        }
    }

    /// Closes the session with `TOKEN_EXPIRED` if its token ran out by `now`.
    fn token_expired(&self, now: Instant) -> bool {
        let expired = self
            .active
            .borrow()
            .as_ref()
            .is_some_and(|a| a.token_deadline().is_some_and(|deadline| deadline <= now));
        if expired {
            tracing::info!("token expired; closing the session");
            self.close(
                DisconnectReason::TokenExpired,
                "the session's token expired; reconnect with a fresh token",
            );
        }
        expired
    }

    /// Takes one decoded frame of `len` bytes that arrived by `now`: counts it, handles it,
    /// and waits for a free in-flight slot before the next read. Returns the clock reading to
    /// set the next read deadline from (`now`, or a fresh one after a wait or the handshake,
    /// which may take a while), or `None` when the connection closes.
    pub async fn take_frame(
        &self,
        frame: ClientFrame,
        len: usize,
        now: Instant,
    ) -> Option<Instant> {
        let kind = switchboard_protocol::kinds::client_kind(frame.kind.as_ref());
        self.shard.stats.frame_in(self.transport, kind, len);
        if self.cancel.is_cancelled() {
            self.on_cancel();
            return None;
        }
        let was_authenticated = self.is_authenticated();
        if self.on_frame(frame, now).await == Flow::Close {
            return None;
        }
        let waited = self.ready_for_next().await;
        Some(if waited || !was_authenticated { Instant::now() } else { now })
    }

    /// Waits, before reading another frame, until the session has a free in-flight slot;
    /// whether it had to wait (the reader's clock reading is stale then).
    async fn ready_for_next(&self) -> bool {
        let max = self.shard.config.limits.max_inflight;
        let session = match &*self.active.borrow() {
            Some(s) if !s.has_slot(max) => s.clone(),
            _ => return false,
        };
        tokio::select! {
            () = session.wait_for_slot(max) => {}
            () = self.cancel.cancelled() => {}
        }
        true
    }

    /// Whether the handshake completed.
    #[must_use]
    pub fn is_authenticated(&self) -> bool {
        self.active.borrow().is_some()
    }

    /// Handles one decoded frame; `now` is the reader's clock reading from when the frame had
    /// arrived (the token's deadline is checked against it: a frame that arrived after the
    /// token ran out is not executed, and a frame costs no clock read of its own).
    async fn on_frame(&self, frame: ClientFrame, now: Instant) -> Flow {
        let active = self.active.borrow().clone();
        match active {
            Some(_) if self.token_expired(now) => Flow::Close,
            Some(session) => {
                let me = SessionRef { shard: self.shard.id, id: session.id };
                handler::dispatch(&self.shard, &session, me, frame);
                Flow::Continue
            }
            None => match frame.kind {
                Some(client_frame::Kind::Hello(hello)) => {
                    // Boxed: the handshake's large state lives on the heap only while it
                    // runs, instead of sizing every connection's reader task for it.
                    match Box::pin(handler::hello::handshake(self, frame.request_id, hello)).await {
                        Some(session) => {
                            self.span.record("user", &*session.user);
                            *self.active.borrow_mut() = Some(session);
                            Flow::Continue
                        }
                        None => Flow::Close,
                    }
                }
                _ => self.fail(
                    frame.request_id,
                    ErrorCode::Unauthenticated,
                    "the first frame must be Hello",
                    DisconnectReason::ProtocolError,
                ),
            },
        }
    }

    /// A message whose text is not a valid frame: tell the client why and close.
    pub fn on_malformed(&self, why: &str) -> Flow {
        self.fail(0, ErrorCode::BadRequest, why, DisconnectReason::ProtocolError)
    }

    /// The transport could not decode a frame: tell the client why and close.
    pub fn on_frame_error(&self, e: &FrameError) -> Flow {
        match e {
            FrameError::TooLarge { .. } => {
                self.fail(0, ErrorCode::TooLarge, &e.to_string(), DisconnectReason::FrameTooLarge)
            }
            FrameError::Malformed(_) => {
                self.fail(0, ErrorCode::BadRequest, &e.to_string(), DisconnectReason::ProtocolError)
            }
            FrameError::Io(_) | _ => Flow::Close,
        }
    }

    /// No frame arrived by [`Self::read_deadline`].
    pub fn on_read_timeout(&self) -> Flow {
        // A token this close to its end when the timer fires counts as expired.
        if self.token_expired(Instant::now() + TOKEN_SLACK) {
            return Flow::Close;
        }
        if self.is_authenticated() {
            self.close(
                DisconnectReason::IdleTimeout,
                "no frame within the idle timeout; send Ping",
            );
        } else {
            self.fail(
                0,
                ErrorCode::Unauthenticated,
                "no Hello within the handshake timeout",
                DisconnectReason::HelloTimeout,
            );
        }
        Flow::Close
    }

    /// Refuses a connection over the per-address rate: error, `Disconnect`, close.
    pub fn refuse(&self, wait: std::time::Duration) {
        let retry = crate::ratelimit::retry_after_ms(wait);
        self.out.replace_and_close(&[
            crate::shard::rate_limited_frame(0, "connection", wait),
            ServerFrame::disconnect(
                DisconnectReason::RateLimited,
                "too many new connections",
                retry,
            ),
        ]);
    }

    /// The broker asked the connection to close (shutdown, or the queue overflowed).
    pub fn on_cancel(&self) {
        self.close(DisconnectReason::Shutdown, "broker shutting down; reconnect");
    }

    /// Queues an error reply, then a `Disconnect`, and asks the transport to stop.
    pub fn fail(
        &self,
        request_id: u64,
        code: ErrorCode,
        message: &str,
        reason: DisconnectReason,
    ) -> Flow {
        self.out.push(switchboard_protocol::Encoded::of(&crate::shard::error_frame(
            request_id, code, message,
        )));
        self.close(reason, message);
        Flow::Close
    }

    /// Queues a `Disconnect` after everything already queued; the writer closes after it.
    pub fn close(&self, reason: DisconnectReason, message: &str) {
        let retry_after_ms = if reason == DisconnectReason::Shutdown { 1_000 } else { 0 };
        self.out.finish_with(ServerFrame::disconnect(reason, message, retry_after_ms));
    }

    /// The transport is done reading: unregister the session everywhere.
    pub fn finish(&self) {
        if let Some(session) = self.active.borrow_mut().take() {
            close_session(&self.shard, session.id);
        }
    }
}
