//! A connection's bounded outbound queue of encoded frames.
//!
//! Fan-out pushes shared `Bytes` here (a reference count, no copy, no encode); the
//! connection's writer drains everything queued into one vectored write. When the queued bytes
//! would pass the limit, the connection is a slow consumer: the queue is dropped, a
//! `Disconnect{slow_consumer}` is queued in its place, and the connection closes once that is
//! written. The client loses nothing: it resyncs after reconnecting.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use switchboard_protocol::{DisconnectReason, Encoded, ServerFrame, SharedFrame};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Lifecycle of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepting frames.
    Open,
    /// A final frame is queued; the writer closes after sending it.
    Closing,
}

/// The queue.
#[derive(Debug)]
pub struct Outbound {
    queue: RefCell<VecDeque<SharedFrame>>,
    bytes: Cell<usize>,
    limit: usize,
    state: Cell<State>,
    /// While held, frames queue up but the writer waits (used during the handshake, so the
    /// Welcome goes out first).
    held: Cell<bool>,
    notify: Notify,
    /// Cancelled when the queue starts closing, so the connection's reader stops too.
    closing: CancellationToken,
}

impl Outbound {
    /// An empty queue that holds at most `limit` bytes; `closing` is cancelled when it closes.
    #[must_use]
    pub fn new(limit: usize, closing: CancellationToken) -> Self {
        Self {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            limit,
            state: Cell::new(State::Open),
            held: Cell::new(false),
            notify: Notify::new(),
            closing,
        }
    }

    /// Bytes queued, not yet taken by the writer.
    #[must_use]
    pub fn queued_bytes(&self) -> usize {
        self.bytes.get()
    }

    /// Queues a frame. Returns `false` when the queue is closing or just overflowed (the
    /// connection is then being cut off as a slow consumer).
    pub fn push(&self, frame: SharedFrame) -> bool {
        if self.state.get() != State::Open {
            return false;
        }
        let bytes = self.bytes.get() + frame.len();
        if bytes > self.limit {
            tracing::info!(queued = self.bytes.get(), limit = self.limit, "slow consumer");
            metrics::counter!(crate::metrics::SLOW_CONSUMERS, "reason" => "queue_full")
                .increment(1);
            self.close_with(ServerFrame::disconnect(
                DisconnectReason::SlowConsumer,
                "outbound queue full; reconnect and sync",
                0,
            ));
            return false;
        }
        self.bytes.set(bytes);
        self.queue.borrow_mut().push_back(frame);
        self.notify.notify_one();
        true
    }

    /// Queues an ephemeral frame (typing) only while the queue is less than half full; under
    /// pressure it is dropped, never the reason for a slow-consumer disconnect.
    pub fn push_droppable(&self, frame: SharedFrame) -> bool {
        if self.bytes.get() + frame.len() > self.limit / 2 {
            return false;
        }
        self.push(frame)
    }

    /// Replaces whatever is queued with `frame`, then closes. Used for slow consumers and for
    /// errors after which nothing else should be sent.
    pub fn close_with(&self, frame: ServerFrame) {
        self.replace_and_close(&[frame]);
    }

    /// Replaces whatever is queued with `frames`, then closes.
    pub fn replace_and_close(&self, frames: &[ServerFrame]) {
        if self.state.get() != State::Open {
            return;
        }
        self.held.set(false);
        let mut q = self.queue.borrow_mut();
        q.clear();
        let mut bytes = 0;
        for f in frames {
            let b = Encoded::of(f);
            bytes += b.len();
            q.push_back(b);
        }
        self.bytes.set(bytes);
        self.state.set(State::Closing);
        self.notify.notify_one();
        self.closing.cancel();
    }

    /// Queues `frame` after what is already queued, then closes (graceful: a reply before the
    /// Disconnect is still delivered).
    pub fn finish_with(&self, frame: ServerFrame) {
        if self.state.get() != State::Open {
            return;
        }
        let bytes = Encoded::of(&frame);
        self.bytes.set(self.bytes.get() + bytes.len());
        self.queue.borrow_mut().push_back(bytes);
        self.held.set(false);
        self.state.set(State::Closing);
        self.notify.notify_one();
        self.closing.cancel();
    }

    /// Stops accepting frames; the writer sends what is queued, then closes. No-op when
    /// already closing.
    pub fn close(&self) {
        if self.state.get() != State::Open {
            return;
        }
        self.held.set(false);
        self.state.set(State::Closing);
        self.notify.notify_one();
        self.closing.cancel();
    }

    /// Holds queued frames back from the writer until [`Self::release_after`].
    pub fn hold(&self) {
        self.held.set(true);
    }

    /// Puts `frame` in front of everything queued while held, and lets the writer go.
    pub fn release_after(&self, frame: &ServerFrame) {
        if self.state.get() == State::Open {
            let bytes = Encoded::of(frame);
            self.bytes.set(self.bytes.get() + bytes.len());
            self.queue.borrow_mut().push_front(bytes);
        }
        self.held.set(false);
        self.notify.notify_one();
    }

    /// The state.
    #[must_use]
    pub fn state(&self) -> State {
        self.state.get()
    }

    /// Waits until there is something to write (or the queue is closing).
    pub async fn ready(&self) {
        loop {
            if self.state.get() == State::Closing
                || (!self.held.get() && !self.queue.borrow().is_empty())
            {
                return;
            }
            self.notify.notified().await;
        }
    }

    /// Takes up to `max_frames` queued frames (at least one if any).
    pub fn drain(&self, max_frames: usize, into: &mut Vec<SharedFrame>) {
        let mut q = self.queue.borrow_mut();
        let n = q.len().min(max_frames);
        let mut taken = 0;
        for b in q.drain(..n) {
            taken += b.len();
            into.push(b);
        }
        self.bytes.set(self.bytes.get().saturating_sub(taken));
        if q.is_empty() && q.capacity() > 16 {
            // Give back what a burst grew; idle connections should stay small.
            *q = VecDeque::new();
        }
    }

    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use prost::Message as _;

    fn frame(len: usize) -> SharedFrame {
        Encoded::new(Bytes::from(vec![0; len]))
    }

    fn tagged(tag: u8) -> SharedFrame {
        Encoded::new(Bytes::from(vec![tag; 10]))
    }

    #[test]
    fn given_queue_over_limit_when_pushing_should_replace_with_slow_consumer_disconnect() {
        let q = Outbound::new(10, CancellationToken::new());
        assert!(q.push(frame(5)));
        assert!(q.push(frame(5)));
        assert!(!q.push(frame(1)));
        assert_eq!(q.state(), State::Closing);
        let mut out = Vec::new();
        q.drain(16, &mut out);
        assert_eq!(out.len(), 1);
        let decoded = ServerFrame::decode(out[0].payload()).unwrap();
        match decoded.kind {
            Some(switchboard_protocol::server_frame::Kind::Disconnect(d)) => {
                assert_eq!(d.reason, DisconnectReason::SlowConsumer as i32);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!q.push(frame(1)), "closed queues accept nothing");
    }

    #[test]
    fn given_frames_when_drained_should_keep_order_and_free_budget() {
        let q = Outbound::new(100, CancellationToken::new());
        for i in 0..5u8 {
            assert!(q.push(tagged(i)));
        }
        let mut out = Vec::new();
        q.drain(3, &mut out);
        assert_eq!(out.iter().map(|b| b.prefixed()[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
        for _ in 0..8 {
            assert!(q.push(tagged(9)));
        }
    }
}
