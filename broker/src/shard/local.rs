//! The sessions a shard hosts and which conversations each receives.
//!
//! Per conversation the shard keeps the sessions that receive it, in two lists: `pending`
//! (asked the owner, no answer yet) and `active` (the owner confirmed membership). Deliveries
//! go to `active` only. A session is added to `pending` *before* the owner is asked, so the
//! shard never tells the owner it lost interest while an answer is on its way. The owner is
//! told when a conversation's lists become empty (`Unsubscribe`).
//!
//! The owner's answer (`Subscribed`) travels in the same FIFO bundle as its deliveries and
//! revocations, so the three are applied in the order the owner decided them: deliveries after
//! the answer reach the session; a `Revoke` applies to the sessions active at that point (a
//! pending session's answer, coming later, reflects membership after the revocation).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;

use switchboard_protocol::{Encoded, ServerFrame, SharedFrame};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::mailbox::{HomeMsg, LocalMsg, Membership, OwnerMsg};
use super::outbound::Outbound;
use super::{SessionRef, Shard, owner_shard, partition};

/// Where a session comes from, for operators (the admin API).
#[derive(Debug, Clone)]
pub struct SessionMeta {
    /// The transport it connected over.
    pub transport: crate::metrics::Transport,
    /// The client's address.
    pub peer: std::net::SocketAddr,
    /// What the client said it is in `Hello.client`.
    pub client: String,
    /// When the handshake completed (ms since the epoch).
    pub connected_at_ms: u64,
}

/// A connection's session as the shard sees it.
#[derive(Debug)]
pub struct LocalSession {
    /// Id on this shard.
    pub id: u64,
    /// The authenticated user.
    pub user: Arc<str>,
    /// Where it comes from.
    pub meta: SessionMeta,
    /// Outbound frames (shared with the connection's writer).
    pub out: Rc<Outbound>,
    convs: RefCell<HashSet<Arc<str>>>,
    /// Users this session receives presence pushes for (explicit subscriptions).
    pub presence_subs: RefCell<HashSet<Arc<str>>>,
    inflight: Cell<usize>,
    inflight_changed: Notify,
    cancel: CancellationToken,
    /// When the session's token runs out (its `exp` plus leeway), on the monotonic clock;
    /// `None`: no deadline. Set by Hello, moved by RefreshToken, enforced by the transport's
    /// reader with the clock reading it takes per frame anyway.
    token_deadline: Cell<Option<tokio::time::Instant>>,
}

impl LocalSession {
    /// A session writing to `out`; `cancel` closes its connection.
    #[must_use]
    pub fn new(
        id: u64,
        user: Arc<str>,
        meta: SessionMeta,
        out: Rc<Outbound>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            id,
            user,
            meta,
            out,
            convs: RefCell::default(),
            presence_subs: RefCell::default(),
            inflight: Cell::new(0),
            inflight_changed: Notify::new(),
            cancel,
            token_deadline: Cell::new(None),
        }
    }

    /// Sets the token's deadline from `deadline_ms` (ms since the epoch; 0: none), reading the
    /// wall clock once: from then on it is an instant on the monotonic clock.
    pub fn set_token_deadline(&self, deadline_ms: u64) {
        let at = match deadline_ms {
            0 => None,
            ms => tokio::time::Instant::now().checked_add(crate::auth::time_left(ms)),
        };
        self.token_deadline.set(at);
    }

    /// When the session's token runs out; `None`: never.
    #[must_use]
    pub fn token_deadline(&self) -> Option<tokio::time::Instant> {
        self.token_deadline.get()
    }

    /// Queues an encoded reply or push.
    pub fn send(&self, frame: &ServerFrame) {
        self.out.push(Encoded::of(frame));
    }

    /// Counts a request whose reply is still to come.
    pub fn request_started(&self) {
        self.inflight.set(self.inflight.get() + 1);
    }

    /// A request was answered.
    pub fn request_done(&self) {
        self.inflight.set(self.inflight.get().saturating_sub(1));
        self.inflight_changed.notify_one();
    }

    /// Waits until fewer than `max` requests are outstanding.
    pub async fn wait_for_slot(&self, max: usize) {
        while self.inflight.get() >= max {
            self.inflight_changed.notified().await;
        }
    }

    /// Whether fewer than `max` requests are outstanding (no wait before the next read).
    #[must_use]
    pub fn has_slot(&self, max: usize) -> bool {
        self.inflight.get() < max
    }

    /// Conversations it receives.
    #[must_use]
    pub fn conversation_count(&self) -> usize {
        self.convs.borrow().len()
    }

    /// Cancelled when the broker wants this connection closed.
    #[must_use]
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }
}

#[derive(Debug, Default)]
struct Interest {
    active: Vec<u64>,
    pending: Vec<u64>,
}

impl Interest {
    fn is_empty(&self) -> bool {
        self.active.is_empty() && self.pending.is_empty()
    }

    fn remove(&mut self, id: u64) {
        self.active.retain(|s| *s != id);
        self.pending.retain(|s| *s != id);
    }
}

/// Sessions hosted by a shard and their interest in conversations.
#[derive(Debug, Default)]
pub struct Local {
    sessions: HashMap<u64, Rc<LocalSession>>,
    interest: HashMap<Arc<str>, Interest>,
    /// Subscriptions waiting for the owner's answer, by token.
    waiters: HashMap<u64, oneshot::Sender<Vec<Membership>>>,
    next_token: u64,
    /// Stand-ins for sessions on other nodes whose request was forwarded here: the reply
    /// goes back through the channel (cluster).
    remote: HashMap<u64, oneshot::Sender<SharedFrame>>,
}

impl Local {
    /// Registers the stand-in for a forwarded request's session; answered stand-ins, and those
    /// whose requester gave up, are dropped.
    pub fn insert_remote(&mut self, id: u64, reply: oneshot::Sender<SharedFrame>) {
        self.remote.retain(|_, tx| !tx.is_closed());
        self.remote.insert(id, reply);
    }

    /// Registers a session.
    pub fn insert(&mut self, session: Rc<LocalSession>) {
        if self.sessions.insert(session.id, session).is_none() {
            metrics::gauge!(crate::metrics::SESSIONS).increment(1.0);
        }
    }

    /// A session by id.
    #[must_use]
    pub fn get(&self, id: u64) -> Option<Rc<LocalSession>> {
        self.sessions.get(&id).cloned()
    }

    /// Whether no session is hosted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Number of hosted sessions.
    #[must_use]
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Registers `id` as waiting for `conv` (no-op when it already waits or receives it).
    /// Public only so the benchmarks can set up interest without an owner shard.
    #[doc(hidden)]
    pub fn add_pending(&mut self, id: u64, conv: &Arc<str>) {
        let Some(s) = self.sessions.get(&id) else { return };
        if s.convs.borrow_mut().insert(conv.clone()) {
            self.interest.entry(conv.clone()).or_default().pending.push(id);
        }
    }

    /// Applies the owner's answer for `id` and `conv`: a member becomes (or stays) active; a
    /// non-member stops receiving. Returns whether nobody here receives `conv` any more.
    fn resolve(&mut self, id: u64, conv: &Arc<str>, member: bool) -> bool {
        let Some(interest) = self.interest.get_mut(conv) else { return false };
        if member {
            if let Some(pos) = interest.pending.iter().position(|s| *s == id) {
                interest.pending.swap_remove(pos);
                interest.active.push(id);
            }
            return false;
        }
        interest.remove(id);
        if let Some(s) = self.sessions.get(&id) {
            s.convs.borrow_mut().remove(conv);
        }
        self.drop_if_empty(conv)
    }

    /// Removes `ids` from `conv`; returns whether nobody here receives `conv` any more.
    fn remove_interest(&mut self, conv: &Arc<str>, ids: &[u64]) -> bool {
        let Some(interest) = self.interest.get_mut(conv) else { return false };
        for id in ids {
            interest.remove(*id);
            if let Some(s) = self.sessions.get(id) {
                s.convs.borrow_mut().remove(conv);
            }
        }
        self.drop_if_empty(conv)
    }

    fn drop_if_empty(&mut self, conv: &Arc<str>) -> bool {
        if self.interest.get(conv).is_some_and(Interest::is_empty) {
            self.interest.remove(conv);
            return true;
        }
        false
    }

    /// Unregisters a session; returns its user and the conversations nobody here receives now.
    fn remove_session(&mut self, id: u64) -> Option<(Arc<str>, Vec<Arc<str>>)> {
        let s = self.sessions.remove(&id)?;
        metrics::gauge!(crate::metrics::SESSIONS).decrement(1.0);
        let convs: Vec<Arc<str>> = s.convs.borrow_mut().drain().collect();
        let mut empty = Vec::new();
        for conv in convs {
            if let Some(interest) = self.interest.get_mut(&conv) {
                interest.remove(id);
            }
            if self.drop_if_empty(&conv) {
                empty.push(conv);
            }
        }
        Some((s.user.clone(), empty))
    }

    /// The sessions hosted here, of `user` only when given.
    pub fn sessions_of<'a>(
        &'a self,
        user: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Rc<LocalSession>> + 'a {
        self.sessions.values().filter(move |s| user.is_none_or(|u| *s.user == *u))
    }

    /// Number of sessions hosted here.
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Users with a session here (for the batched presence lease renewal).
    #[must_use]
    pub fn users(&self) -> HashSet<Arc<str>> {
        self.sessions.values().map(|s| s.user.clone()).collect()
    }

    /// Active sessions of `user` receiving `conv`.
    fn active_sessions_of(&self, conv: &str, user: &str) -> Vec<u64> {
        let Some(interest) = self.interest.get(conv) else { return Vec::new() };
        interest
            .active
            .iter()
            .copied()
            .filter(|id| self.sessions.get(id).is_some_and(|s| &*s.user == user))
            .collect()
    }
}

fn unsubscribe(shard: &Rc<Shard>, conv: Arc<str>) {
    shard.to_owner(&conv.clone(), OwnerMsg::Unsubscribe { shard: shard.id, conversation: conv });
}

/// Applies one message of a bundle from an owner or a home shard. Public only for the
/// benchmarks (fan-out to local sessions).
#[doc(hidden)]
pub fn apply(shard: &Rc<Shard>, msg: LocalMsg) {
    match msg {
        LocalMsg::Frame { session, frame, completes } => {
            let s = shard.local.borrow().get(session);
            if let Some(s) = s {
                s.out.push(frame);
                if completes {
                    s.request_done();
                }
            } else if let Some(reply) = shard.local.borrow_mut().remote.remove(&session) {
                let _ = reply.send(frame);
            }
        }
        LocalMsg::Deliver { conversation, frame, skip, droppable } => {
            let local = shard.local.borrow();
            let Some(interest) = local.interest.get(&conversation) else { return };
            let skip = skip.filter(|s| s.shard == shard.id).map(|s| s.id);
            if !droppable {
                let n = interest.active.len() as u64 - u64::from(skip.is_some());
                shard.stats.deliveries.set(shard.stats.deliveries.get() + n);
            }
            for id in &interest.active {
                if Some(*id) == skip {
                    continue;
                }
                if let Some(s) = local.sessions.get(id) {
                    if droppable {
                        s.out.push_droppable(frame.clone());
                    } else {
                        s.out.push(frame.clone());
                    }
                }
            }
        }
        LocalMsg::Push { sessions, frame, droppable } => {
            let local = shard.local.borrow();
            for id in sessions {
                if let Some(s) = local.sessions.get(&id) {
                    if droppable {
                        s.out.push_droppable(frame.clone());
                    } else {
                        s.out.push(frame.clone());
                    }
                }
            }
        }
        LocalMsg::Revoke { conversation, user } => {
            let empty = {
                let mut local = shard.local.borrow_mut();
                let ids = local.active_sessions_of(&conversation, &user);
                local.remove_interest(&conversation, &ids)
            };
            if empty {
                unsubscribe(shard, conversation);
            }
        }
        LocalMsg::Subscribed { token, sessions, conversations, outcomes } => {
            let (empty, waiter) = {
                let mut local = shard.local.borrow_mut();
                let mut empty = Vec::new();
                for (conv, outcome) in conversations.iter().zip(&outcomes) {
                    let member = *outcome == Membership::Member;
                    let mut now_empty = false;
                    for id in &sessions {
                        now_empty |= local.resolve(*id, conv, member);
                    }
                    if now_empty {
                        empty.push(conv.clone());
                    }
                }
                (empty, local.waiters.remove(&token))
            };
            for conv in empty {
                unsubscribe(shard, conv);
            }
            if let Some(w) = waiter {
                let _ = w.send(outcomes);
            }
        }
        LocalMsg::UserEvent { sessions, user, event } => {
            if event.added {
                let shard = shard.clone();
                tokio::task::spawn_local(async move {
                    if subscribe(&shard, &user, &sessions, vec![event.conversation.clone()])
                        .await
                        .is_err()
                    {
                        tracing::error!(conversation = %event.conversation, "could not subscribe a new member's sessions");
                    }
                    if event.silent {
                        return;
                    }
                    let local = shard.local.borrow();
                    for id in &sessions {
                        if let Some(s) = local.get(*id) {
                            s.out.push(event.frame.clone());
                        }
                    }
                });
            } else {
                // Delivery stops through the owner's `Revoke`, ordered with its deliveries; this
                // event (via the home shard) may arrive before or after that, so it only informs.
                let local = shard.local.borrow();
                for id in &sessions {
                    if let Some(s) = local.get(*id) {
                        s.out.push(event.frame.clone());
                    }
                }
            }
        }
    }
}

/// Makes `sessions` (all of `user`, hosted here) receive `convs`, as far as the owners agree,
/// and waits until every owner's answer has been applied (in order with its deliveries).
/// Conversations already pending or active for a session are asked again, so the caller knows
/// they are settled. Returns the conversations the owners accepted.
///
/// # Errors
/// When an owner could not tell (storage failed).
pub(crate) async fn subscribe(
    shard: &Rc<Shard>,
    user: &Arc<str>,
    sessions: &[u64],
    convs: Vec<Arc<str>>,
) -> Result<Vec<Arc<str>>, Unavailable> {
    // Register as pending first, so a concurrent close cannot make us unsubscribe while an
    // answer is on its way.
    let mut by_owner: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
    {
        let mut local = shard.local.borrow_mut();
        for conv in convs {
            for id in sessions {
                local.add_pending(*id, &conv);
            }
            by_owner.entry(owner_shard(partition(&conv), shard.count)).or_default().push(conv);
        }
    }
    // Conversations this node holds no copy of are followed through their leaders, once the
    // leader has checked the membership and recorded this node's interest.
    let all: Vec<Arc<str>> = by_owner.values().flatten().cloned().collect();
    let followed = register_followed(shard, user, &all).await?;
    let mut waits = Vec::with_capacity(by_owner.len());
    for (owner, conversations) in by_owner {
        let (here, remote): (Vec<Arc<str>>, Vec<Arc<str>>) =
            conversations.into_iter().partition(|c| !followed.contains_key(c));
        for (conversations, remote) in [(here, false), (remote, true)] {
            if conversations.is_empty() {
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let token = {
                let mut local = shard.local.borrow_mut();
                local.next_token += 1;
                let token = local.next_token;
                local.waiters.insert(token, tx);
                token
            };
            let msg = if remote {
                OwnerMsg::SubscribeFollowed {
                    shard: shard.id,
                    user: user.clone(),
                    sessions: sessions.to_vec(),
                    conversations: conversations
                        .iter()
                        .map(|c| (c.clone(), followed.get(c).copied().flatten()))
                        .collect(),
                    token,
                }
            } else {
                OwnerMsg::Subscribe {
                    shard: shard.id,
                    user: user.clone(),
                    sessions: sessions.to_vec(),
                    conversations: conversations.clone(),
                    token,
                }
            };
            shard.send_owner_at(owner, msg);
            waits.push(async move { (conversations, rx.await) });
        }
    }
    let mut accepted = Vec::new();
    let mut failed = false;
    for (conversations, outcomes) in futures::future::join_all(waits).await {
        let Ok(outcomes) = outcomes else {
            failed = true;
            continue;
        };
        for (conv, outcome) in conversations.into_iter().zip(outcomes) {
            match outcome {
                Membership::Member => accepted.push(conv),
                Membership::NotMember => {}
                Membership::Unavailable => failed = true,
            }
        }
    }
    if failed { Err(Unavailable) } else { Ok(accepted) }
}

/// Registers this node's interest in those of `convs` whose partition it holds no complete
/// copy of (cluster, more nodes than replicas) with its leader: per conversation, its
/// committed head, or `None` when `user` is not a member.
///
/// # Errors
/// When some leader does not answer after a few attempts (planned again each time): the
/// subscription fails like one an owner could not answer.
async fn register_followed(
    shard: &Rc<Shard>,
    user: &Arc<str>,
    convs: &[Arc<str>],
) -> Result<HashMap<Arc<str>, Option<u64>>, Unavailable> {
    use super::ReadAt;
    use super::interest::wire;
    let mut out = HashMap::new();
    let Some(cluster) = &shard.cluster else { return Ok(out) };
    let me = cluster.gossip.borrow().self_id;
    let mut todo: Vec<Arc<str>> = match shard.locator() {
        Some(l) => {
            convs.iter().filter(|c| l.locate(partition(c)) != ReadAt::Here).cloned().collect()
        }
        None => Vec::new(),
    };
    for attempt in 0..3u64 {
        if todo.is_empty() {
            break;
        }
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
        }
        let mut by_node: HashMap<crate::cluster::NodeId, Vec<Arc<str>>> = HashMap::new();
        if let Some(l) = shard.locator() {
            for c in &todo {
                if let Some(n) = l.interest_at(partition(c)) {
                    by_node.entry(n).or_default().push(c.clone());
                }
            }
        }
        let asks = by_node.into_iter().map(|(node, convs)| async move {
            let items = convs
                .iter()
                .map(|c| wire::Item {
                    conversation: c.to_string(),
                    after_seq: 0,
                    user: user.to_string(),
                })
                .collect();
            let request = wire::Request { node: me, items };
            (convs, super::interest::post(shard, node, request).await)
        });
        for (convs, replies) in futures::future::join_all(asks).await {
            let Some(replies) = replies else { continue };
            for (c, r) in convs.into_iter().zip(replies) {
                if r.ok {
                    out.insert(c, r.member.then_some(r.head));
                }
            }
        }
        todo.retain(|c| !out.contains_key(c));
    }
    if let Some(c) = todo.first() {
        tracing::warn!(conversation = %c, left = todo.len(), "no leader answered an interest registration");
        return Err(Unavailable);
    }
    Ok(out)
}

/// An owner could not answer a subscription (storage failure or shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable;

/// Unregisters a closed session and tells the owners and the home shards.
pub(crate) fn close_session(shard: &Rc<Shard>, id: u64) {
    let subs: Vec<Arc<str>> = shard
        .local
        .borrow()
        .get(id)
        .map(|s| s.presence_subs.borrow_mut().drain().collect())
        .unwrap_or_default();
    let me = SessionRef { shard: shard.id, id };
    for (home, users) in super::group_by_home(subs, shard.count) {
        shard.send_home_at(home, HomeMsg::PresenceUnsubscribe { session: me, users });
    }
    let removed = shard.local.borrow_mut().remove_session(id);
    if let Some((user, empty)) = removed {
        for conv in empty {
            unsubscribe(shard, conv);
        }
        shard.to_home(
            &user.clone(),
            HomeMsg::SessionDown { user, session: SessionRef { shard: shard.id, id } },
        );
    }
    shard.check_drained();
}

/// Asks every connection on this shard to close, telling each client why (the connections
/// react to the shard's cancellation token).
pub(crate) fn disconnect_all(shard: &Rc<Shard>) {
    shard.cancel.cancel();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn session() -> LocalSession {
        let cancel = CancellationToken::new();
        let meta = SessionMeta {
            transport: crate::metrics::Transport::Tcp,
            peer: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            client: String::new(),
            connected_at_ms: 0,
        };
        let out = Rc::new(Outbound::new(1 << 20, cancel.clone()));
        LocalSession::new(1, Arc::from("alice"), meta, out, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn given_a_token_deadline_should_hold_it_on_the_monotonic_clock() {
        let s = session();
        assert_eq!(s.token_deadline(), None, "no deadline before Hello");
        let now_ms = crate::shard::owner::now_ms();
        s.set_token_deadline(now_ms + 60_000);
        let deadline = s.token_deadline().expect("a deadline");
        let left = deadline - tokio::time::Instant::now();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60), "{left:?}");
        // Paused time moves the monotonic clock only: the deadline stays put and is reached.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(deadline <= tokio::time::Instant::now());
        // Already past: due at once. No deadline: none. One beyond any clock: never (no panic).
        s.set_token_deadline(now_ms - 1_000);
        assert!(s.token_deadline().is_some_and(|d| d <= tokio::time::Instant::now()));
        s.set_token_deadline(0);
        assert_eq!(s.token_deadline(), None);
        s.set_token_deadline(u64::MAX);
        let _ = s.token_deadline();
    }
}
