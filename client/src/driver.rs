//! The background task of a [`Client`](crate::Client): one connection at a time, request/reply
//! matching, heartbeats, sync passes and reconnects.
//!
//! Everything runs on one task, so there is no locking beyond the [`SyncState`] that
//! [`Client::position`](crate::Client::position) reads. Per connection ("link"): frames are
//! written from a queue as long as fewer than `limits.max_inflight` requests are unanswered;
//! replies are matched by request id; pushes go through the state machine; a sync pass runs
//! whenever the state needs one (repeated needs coalesce into the next pass).
//!
//! The driver also sends requests of its own, whose replies it consumes: automatic delivery
//! receipts (see [`Delivery`]) once a link has resumed, and after a reconnect the presence
//! subscriptions of the previous connections.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::mem;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use switchboard_protocol::{
    self as pb, ClientFrame, DisconnectReason, FeedEventKind, FrameError, SendAck, ServerFrame,
    SyncPage, client_frame, server_frame,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, sleep_until, timeout};
use tracing::{debug, warn};

use crate::builder::Config;
use crate::delivery::Delivery;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::handshake::{self, Conn, ConnectError, Session};
use crate::state::SyncState;

mod frames;
mod requests;

use requests::{Internal, Outbound, Pending};

/// Heartbeat interval when the Welcome does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);
/// The broker's idle timeout when the Welcome does not say.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The least wait before retrying a failed sync request.
const SYNC_RETRY: Duration = Duration::from_secs(1);
/// `Limits.max_presence_users` when the Welcome does not say.
pub(crate) const DEFAULT_MAX_PRESENCE_USERS: u32 = 500;

type Reply<T> = oneshot::Sender<Result<T>>;

/// What a [`Client`](crate::Client) handle asks of the driver.
pub(crate) enum Command {
    /// A request whose reply is returned as is (everything but Send and Sync).
    Request { kind: client_frame::Kind, reply: Reply<server_frame::Kind> },
    /// A send: retried with the same `client_msg_id` across reconnects until answered.
    Send { send: pb::Send, reply: Reply<SendAck> },
    /// Run a full sync pass and report when it completes.
    Sync { reply: Reply<()> },
    /// Stop; `done` fires after `Event::Closed` was emitted.
    Close { done: oneshot::Sender<()> },
}

/// Why the connection ended.
struct Lost {
    reason: Option<DisconnectReason>,
    message: String,
    retry_after: Duration,
}

enum Stop {
    /// The application closed the client (or dropped every handle).
    Closed,
    Lost(Lost),
}

impl Stop {
    fn lost(message: impl Into<String>) -> Self {
        Stop::Lost(Lost { reason: None, message: message.into(), retry_after: Duration::ZERO })
    }

    fn violation(what: impl std::fmt::Display) -> Self {
        warn!(%what, "protocol violation by the broker; reconnecting");
        Stop::lost(format!("protocol violation: {what}"))
    }
}

/// The sync pass of a link.
#[derive(Default)]
struct Pass {
    /// A Sync request is queued or in flight.
    running: bool,
    /// The continuation of the last page (empty for the first request of a pass).
    continuation: Bytes,
    /// `sync_now` callers waiting for this pass.
    waiters: Vec<Reply<()>>,
    /// This is the first pass of the link; sends are held back until it completes.
    resume: bool,
    /// A failed Sync is retried no earlier than this.
    retry_at: Option<Instant>,
}

/// One connection.
struct Link {
    framed: Conn,
    pending: HashMap<u64, Pending>,
    queue: VecDeque<Outbound>,
    /// 0: unlimited.
    max_inflight: usize,
    /// The largest frame the broker accepts.
    max_frame: usize,
    heartbeat: Duration,
    /// Without a frame from the broker for this long, the connection is considered dead.
    dead_after: Duration,
    last_read: Instant,
    ping_outstanding: bool,
    /// The resume pass completed: sends and automatic requests may be written.
    sends_enabled: bool,
    pass: Pass,
    /// Not the client's first connection.
    reconnect: bool,
    /// The most users in one presence request.
    max_presence_users: usize,
}

enum Wake {
    Command(Option<Command>),
    Frame(Option<Result<ServerFrame, FrameError>>),
    Heartbeat,
    SyncRetry,
    DeliveryDue,
}

/// The background task. See the module documentation.
pub(crate) struct Driver {
    cfg: Arc<Config>,
    cmds: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    state: Arc<Mutex<SyncState>>,
    user_id: String,
    next_id: u64,
    /// Unanswered sends in the order they were issued, kept across reconnects.
    sends: BTreeMap<u64, (pb::Send, Reply<SendAck>)>,
    next_send: u64,
    /// `sync_now` callers waiting for the next pass to start.
    sync_waiters: Vec<Reply<()>>,
    closers: Vec<oneshot::Sender<()>>,
    delivery: Delivery,
    /// The users the application subscribed to for presence, renewed after every reconnect.
    presence_subs: BTreeSet<String>,
    /// `Limits.max_presence_users` of the current connection, shared with the client handles.
    max_presence_users: Arc<AtomicU32>,
}

fn millis_or(ms: u32, default: Duration) -> Duration {
    if ms == 0 { default } else { Duration::from_millis(u64::from(ms)) }
}

impl Driver {
    pub(crate) fn new(
        cfg: Arc<Config>,
        cmds: mpsc::UnboundedReceiver<Command>,
        events: mpsc::UnboundedSender<Event>,
        state: Arc<Mutex<SyncState>>,
        max_presence_users: Arc<AtomicU32>,
        user_id: String,
        next_id: u64,
    ) -> Self {
        let delivery = Delivery::new(cfg.auto_delivery_receipts);
        Self {
            cfg,
            cmds,
            events,
            state,
            user_id,
            next_id,
            sends: BTreeMap::new(),
            next_send: 0,
            sync_waiters: Vec::new(),
            closers: Vec::new(),
            delivery,
            presence_subs: BTreeSet::new(),
            max_presence_users,
        }
    }

    /// Serves `first`, then reconnects after every loss until closed.
    pub(crate) async fn run(mut self, first: Session) {
        let mut session = first;
        let mut reconnect = false;
        loop {
            let link = self.on_connected(session, reconnect);
            reconnect = true;
            let Some(lost) = self.serve(link).await else { break };
            self.emit(Event::Disconnected { reason: lost.reason, message: lost.message });
            if !self.cfg.reconnect.enabled {
                for (_, (_, reply)) in mem::take(&mut self.sends) {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                break;
            }
            match self.reconnect(lost.retry_after).await {
                Some(next) => session = next,
                None => break,
            }
        }
        self.shutdown();
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&mut self, event: Event) {
        // The application may have dropped its EventStream; the client keeps working, but
        // what it does not receive is not acknowledged as delivered.
        if self.events.is_closed() {
            return;
        }
        match &event {
            Event::Message(m) => self.delivery.emitted(&m.conversation_id, m.seq),
            Event::Revoked { conversation_id } | Event::CursorReset { conversation_id, .. } => {
                self.delivery.forget(conversation_id);
            }
            Event::Feed(f) if f.kind == FeedEventKind::Removed as i32 => {
                self.delivery.forget(&f.conversation_id);
            }
            _ => {}
        }
        let _ = self.events.send(event);
    }

    fn emit_all(&mut self, events: Vec<Event>) {
        for event in events {
            self.emit(event);
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn add_send(&mut self, send: pb::Send, reply: Reply<SendAck>) -> u64 {
        let key = self.next_send;
        self.next_send += 1;
        self.sends.insert(key, (send, reply));
        key
    }

    fn shutdown(&mut self) {
        for (_, (_, reply)) in mem::take(&mut self.sends) {
            let _ = reply.send(Err(Error::Closed));
        }
        for waiter in mem::take(&mut self.sync_waiters) {
            let _ = waiter.send(Err(Error::Closed));
        }
        self.emit(Event::Closed);
        for done in mem::take(&mut self.closers) {
            let _ = done.send(());
        }
    }

    /// Backs off and reconnects until a session is established; `None` when the client
    /// closed or the failure is permanent.
    async fn reconnect(&mut self, mut floor: Duration) -> Option<Session> {
        let mut attempt = 0u32;
        loop {
            let delay = self.cfg.reconnect.delay_at_least(attempt, floor, &mut rand::rng());
            attempt = attempt.saturating_add(1);
            debug!(?delay, attempt, "reconnecting after backoff");
            self.offline(sleep(delay)).await?;
            let hello_id = self.next_id();
            let position = self.lock().position();
            let user = Some(self.user_id.clone());
            let attempt_fut = handshake::establish(Arc::clone(&self.cfg), position, hello_id, user);
            match self.offline(attempt_fut).await? {
                Ok(session) => return Some(session),
                Err(ConnectError::Permanent(error)) => {
                    warn!(%error, "reconnect failed permanently; closing the client");
                    return None;
                }
                Err(ConnectError::Transient { error, retry_after }) => {
                    debug!(%error, attempt, "reconnect attempt failed");
                    floor = retry_after;
                }
            }
        }
    }

    /// Drives `fut` while disconnected: sends wait for the next connection, other requests
    /// fail with `ConnectionLost`. `None` when the client is closed meanwhile.
    async fn offline<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = self.cmds.recv() => match cmd {
                    None => return None,
                    Some(Command::Close { done }) => {
                        self.closers.push(done);
                        return None;
                    }
                    // Subscriptions end with the session: there is nothing to unsubscribe from
                    // but the renewal after reconnecting.
                    Some(Command::Request {
                        kind: client_frame::Kind::PresenceUnsubscribe(u),
                        reply,
                    }) => {
                        self.forget_subscriptions(&u.users);
                        let _ = reply.send(Ok(server_frame::Kind::Ack(pb::Ack {})));
                    }
                    Some(Command::Request { reply, .. }) => {
                        let _ = reply.send(Err(Error::ConnectionLost));
                    }
                    Some(Command::Sync { reply }) => {
                        let _ = reply.send(Err(Error::ConnectionLost));
                    }
                    Some(Command::Send { send, reply }) => {
                        self.add_send(send, reply);
                    }
                },
            }
        }
    }

    /// Sets up a link for a fresh session and applies `Welcome.resumed`.
    fn on_connected(&mut self, session: Session, reconnect: bool) -> Link {
        let Session { framed, welcome } = session;
        let limits = welcome.limits.unwrap_or_default();
        let heartbeat = millis_or(welcome.heartbeat_interval_ms, DEFAULT_HEARTBEAT);
        let idle = millis_or(welcome.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT);
        let server_max = usize::try_from(limits.max_frame_bytes).unwrap_or(usize::MAX);
        let max_frame = match server_max {
            0 => self.cfg.max_frame_bytes,
            n => n.min(self.cfg.max_frame_bytes),
        };
        let max_presence = match limits.max_presence_users {
            0 => DEFAULT_MAX_PRESENCE_USERS,
            n => n,
        };
        self.max_presence_users.store(max_presence, Ordering::Relaxed);
        debug!(session = %welcome.session_id, reconnect, "connected");
        self.emit(Event::Connected {
            user_id: welcome.user_id,
            session_id: welcome.session_id,
            reconnect,
        });
        let mut link = Link {
            framed,
            pending: HashMap::new(),
            queue: VecDeque::new(),
            max_inflight: usize::try_from(limits.max_inflight).unwrap_or(usize::MAX),
            max_frame,
            heartbeat,
            dead_after: idle.max(heartbeat * 2),
            last_read: Instant::now(),
            ping_outstanding: false,
            sends_enabled: false,
            pass: Pass { resume: true, ..Pass::default() },
            reconnect,
            max_presence_users: usize::try_from(max_presence).unwrap_or(usize::MAX),
        };
        match welcome.resumed {
            Some(page) => {
                self.lock().begin_pass();
                link.pass.running = true;
                self.on_sync_page(&mut link, page);
            }
            // A broker that ignored `resume`: a regular pass does the same.
            None => self.lock().request_sync(),
        }
        link
    }

    /// Serves a link until it is lost (`Some`) or the client closes (`None`).
    async fn serve(&mut self, mut link: Link) -> Option<Lost> {
        let mut heartbeat = interval_at(Instant::now() + link.heartbeat, link.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut step = self.pump(&mut link).await;
        let stop = loop {
            if let Err(stop) = step {
                break stop;
            }
            let retry_at = link.pass.retry_at;
            let delivery_at = if link.sends_enabled { self.delivery.next_due() } else { None };
            let wake = tokio::select! {
                cmd = self.cmds.recv() => Wake::Command(cmd),
                frame = link.framed.next() => Wake::Frame(frame),
                _ = heartbeat.tick() => Wake::Heartbeat,
                () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    Wake::SyncRetry
                }
                () = sleep_until(delivery_at.unwrap_or_else(Instant::now)),
                    if delivery_at.is_some() => Wake::DeliveryDue,
            };
            step = match wake {
                Wake::Command(None) => Err(Stop::Closed),
                Wake::Command(Some(Command::Close { done })) => {
                    self.closers.push(done);
                    Err(Stop::Closed)
                }
                Wake::Command(Some(cmd)) => {
                    self.on_command(&mut link, cmd);
                    Ok(())
                }
                Wake::Frame(None) => Err(Stop::lost("connection closed by the broker")),
                Wake::Frame(Some(Err(e))) => Err(Stop::lost(e.to_string())),
                Wake::Frame(Some(Ok(frame))) => {
                    link.last_read = Instant::now();
                    self.on_frame(&mut link, frame)
                }
                Wake::Heartbeat => self.on_heartbeat(&mut link),
                Wake::SyncRetry => {
                    link.pass.retry_at = None;
                    Ok(())
                }
                // `pump` queues the receipts that are due.
                Wake::DeliveryDue => Ok(()),
            };
            if step.is_ok() {
                step = self.pump(&mut link).await;
            }
        };
        match stop {
            Stop::Closed => {
                let _ = timeout(
                    Duration::from_secs(1),
                    SinkExt::<ClientFrame>::close(&mut link.framed),
                )
                .await;
                self.drop_link(link, || Error::Closed);
                None
            }
            Stop::Lost(lost) => {
                debug!(message = %lost.message, "connection lost");
                self.drop_link(link, || Error::ConnectionLost);
                Some(lost)
            }
        }
    }

    /// Fails what the link had in flight; sends stay for the next link.
    fn drop_link(&mut self, link: Link, error: impl Fn() -> Error) {
        self.delivery.connection_lost();
        for pending in link.pending.into_values() {
            if let Pending::Request { reply, .. } = pending {
                let _ = reply.send(Err(error()));
            }
        }
        for out in link.queue {
            if let Outbound::Request { reply, .. } = out {
                let _ = reply.send(Err(error()));
            }
        }
        for waiter in link.pass.waiters.into_iter().chain(mem::take(&mut self.sync_waiters)) {
            let _ = waiter.send(Err(error()));
        }
    }

    fn on_command(&mut self, link: &mut Link, cmd: Command) {
        match cmd {
            Command::Request { kind, reply } => {
                // The subscriptions to renew follow the application's requests in order.
                match &kind {
                    client_frame::Kind::PresenceSubscribe(s) => {
                        self.presence_subs.extend(s.users.iter().cloned());
                    }
                    client_frame::Kind::PresenceUnsubscribe(u) => {
                        self.forget_subscriptions(&u.users);
                    }
                    _ => {}
                }
                link.queue.push_back(Outbound::Request { kind, reply });
            }
            Command::Send { send, reply } => {
                let key = self.add_send(send, reply);
                if link.sends_enabled {
                    link.queue.push_back(Outbound::Send(key));
                }
            }
            Command::Sync { reply } => self.sync_waiters.push(reply),
            Command::Close { done } => self.closers.push(done),
        }
    }

    fn on_heartbeat(&mut self, link: &mut Link) -> Result<(), Stop> {
        let silent = link.last_read.elapsed();
        if silent >= link.dead_after {
            return Err(Stop::lost(format!("no frame from the broker for {silent:?}")));
        }
        if !link.ping_outstanding {
            link.ping_outstanding = true;
            link.queue.push_front(Outbound::Ping);
        }
        Ok(())
    }

    fn forget_subscriptions(&mut self, users: &[String]) {
        for user in users {
            self.presence_subs.remove(user);
        }
    }

    /// Starts a sync pass if one is needed and queues the delivery receipts that are due, then
    /// writes queued frames while in-flight slots are free.
    async fn pump(&mut self, link: &mut Link) -> Result<(), Stop> {
        self.maybe_start_pass(link);
        if link.sends_enabled {
            for (conversation_id, seq) in self.delivery.due(Instant::now()) {
                let kind =
                    client_frame::Kind::MarkDelivered(pb::MarkDelivered { conversation_id, seq });
                link.queue.push_back(Outbound::Internal { kind, purpose: Internal::Delivered });
            }
        }
        let mut wrote = false;
        while link.max_inflight == 0 || link.pending.len() < link.max_inflight {
            let Some(out) = link.queue.pop_front() else { break };
            let (kind, pending) = match out {
                Outbound::Request { kind, reply } => {
                    let pending = Pending::request(&kind, reply);
                    (kind, pending)
                }
                Outbound::Internal { kind, purpose } => (kind, Pending::Internal(purpose)),
                Outbound::Send(key) => {
                    let Some((send, _)) = self.sends.get(&key) else { continue };
                    (client_frame::Kind::Send(send.clone()), Pending::Send(key))
                }
                Outbound::Sync => {
                    let sync = pb::Sync {
                        position: Some(self.lock().position()),
                        limit: 0,
                        continuation: link.pass.continuation.clone(),
                    };
                    (client_frame::Kind::Sync(sync), Pending::Sync)
                }
                Outbound::Ping => (client_frame::Kind::Ping(pb::Ping {}), Pending::Ping),
            };
            let frame = ClientFrame::request(self.next_id(), kind);
            let len = frame.encoded_len();
            if len > link.max_frame {
                let max = link.max_frame;
                self.reject(link, pending, || Error::Frame(FrameError::TooLarge { len, max }));
                continue;
            }
            let id = frame.request_id;
            link.framed.feed(frame).await.map_err(|e| Stop::lost(e.to_string()))?;
            link.pending.insert(id, pending);
            wrote = true;
        }
        if wrote {
            SinkExt::<ClientFrame>::flush(&mut link.framed)
                .await
                .map_err(|e| Stop::lost(e.to_string()))?;
        }
        Ok(())
    }

    /// Fails a request without closing the connection.
    fn reject(&mut self, link: &mut Link, pending: Pending, error: impl Fn() -> Error) {
        match pending {
            Pending::Request { reply, subscribed, .. } => {
                self.forget_subscriptions(&subscribed);
                let _ = reply.send(Err(error()));
            }
            Pending::Send(key) => {
                if let Some((_, reply)) = self.sends.remove(&key) {
                    let _ = reply.send(Err(error()));
                }
            }
            Pending::Sync => self.fail_pass(link, 0, error),
            Pending::Ping => link.ping_outstanding = false,
            Pending::Internal(purpose) => warn!(?purpose, error = %error(), "request dropped"),
        }
    }

    fn maybe_start_pass(&mut self, link: &mut Link) {
        if link.pass.running || link.pass.retry_at.is_some() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.needs_sync() && self.sync_waiters.is_empty() {
            return;
        }
        state.begin_pass();
        drop(state);
        link.pass.running = true;
        link.pass.continuation = Bytes::new();
        link.pass.waiters = mem::take(&mut self.sync_waiters);
        link.queue.push_front(Outbound::Sync);
    }

    fn on_sync_page(&mut self, link: &mut Link, page: SyncPage) {
        let has_more = page.has_more;
        let (events, continuation) = self.lock().apply_page(page);
        self.emit_all(events);
        match continuation {
            Some(c) if !c.is_empty() => {
                link.pass.continuation = c;
                link.queue.push_front(Outbound::Sync);
            }
            _ => {
                if has_more {
                    warn!("sync page has_more without a continuation; ending the pass");
                }
                link.pass.running = false;
                self.lock().end_pass();
                for waiter in mem::take(&mut link.pass.waiters) {
                    let _ = waiter.send(Ok(()));
                }
                self.end_resume_pass(link);
            }
        }
    }

    /// A Sync request failed: report to the pass's waiters and retry later.
    fn fail_pass(&mut self, link: &mut Link, retry_after_ms: u64, error: impl Fn() -> Error) {
        link.pass.running = false;
        self.lock().request_sync();
        let wait = Duration::from_millis(retry_after_ms).max(SYNC_RETRY);
        link.pass.retry_at = Some(Instant::now() + wait);
        for waiter in mem::take(&mut link.pass.waiters) {
            let _ = waiter.send(Err(error()));
        }
        self.end_resume_pass(link);
    }

    /// After the first pass of a link, resend every unanswered send (same `client_msg_id`)
    /// and let new ones through; after a reconnect, renew the presence subscriptions.
    fn end_resume_pass(&mut self, link: &mut Link) {
        if !mem::take(&mut link.pass.resume) {
            return;
        }
        link.sends_enabled = true;
        link.queue.extend(self.sends.keys().map(|k| Outbound::Send(*k)));
        if link.reconnect && !self.presence_subs.is_empty() {
            let users: Vec<String> = self.presence_subs.iter().cloned().collect();
            for chunk in users.chunks(link.max_presence_users.max(1)) {
                let kind = client_frame::Kind::PresenceSubscribe(pb::PresenceSubscribe {
                    users: chunk.to_vec(),
                });
                link.queue.push_back(Outbound::Internal { kind, purpose: Internal::Resubscribe });
            }
        }
    }
}

#[cfg(test)]
mod tests;
