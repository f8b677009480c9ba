//! `chat` and `churn`: users driven through the Rust client crate, as an application would.
//!
//! Every user is one [`switchboard_client::Client`] with its event stream. The plan decides
//! who talks to whom: direct conversations (each user paired at random `directs` times) and
//! groups whose sizes follow a Zipf distribution (many small rooms, a few large ones). Each
//! user sends on an open-loop Poisson schedule (latency counts from the intended send time),
//! picking a group with probability `group_share`, announcing typing first with probability
//! `typing`; it marks what it received as read every `read_every`, its client acknowledges
//! delivery on its own, and it follows a few other users' presence.
//!
//! Churn: at `churn_rate` per second a random online user's connection is dropped (as a network
//! failure would) and held down for `offline`; the client reconnects, resumes and syncs on its
//! own, and re-sends what was unacknowledged. The run then checks what a chat user cares
//! about: per conversation, every member received every acknowledged message, in order
//! (`missing` and `order_violations` must be 0), and reports the reconnect time and how many
//! messages arrived through resync rather than live.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use switchboard_client::{
    Client, Content, ErrorCode, Event, EventStream, HistoryVisibility, Message, SendAck,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::report::Report;
use crate::runner::measure;
use crate::scenario::Ctx;
use crate::stats::{Latencies, Shared};
use crate::target::switchboard::Switchboard;
use crate::target::switchboard::client::{KillSwitch, builder};

use crate::target::switchboard::{CONTENT_TYPE, MEMBERS_PER_REQUEST};
/// How long the wind-down waits for sends still in flight.
const DRAIN: Duration = Duration::from_secs(30);

/// What a chat-shaped run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Scenario name for the report.
    pub name: &'static str,
    /// Users (one connection each).
    pub users: usize,
    /// Direct conversations per user.
    pub directs: usize,
    /// Group conversations.
    pub groups: usize,
    /// Largest group.
    pub max_group: usize,
    /// Zipf exponent of group sizes (larger: more small groups).
    pub zipf: f64,
    /// Share of messages sent to groups (by users in at least one group).
    pub group_share: f64,
    /// Probability that a message is preceded by a typing indicator.
    pub typing: f64,
    /// How often each user marks what it received as read (`None`: never).
    pub read_every: Option<Duration>,
    /// Other users whose presence each user subscribes to.
    pub presence: usize,
    /// Connections dropped per second.
    pub churn_rate: f64,
    /// How long a dropped user stays offline before its client reconnects.
    pub offline: Duration,
    /// Messages per second over all users.
    pub rate: f64,
}

/// A conversation of the plan: its members (user indexes; the first creates it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv {
    /// Members; the first creates it.
    pub members: Vec<usize>,
    /// A group (else a direct conversation).
    pub group: bool,
}

/// Draws a group size in `lo..=hi` with probability proportional to `size^-s`.
pub fn zipf(rng: &mut impl Rng, lo: usize, hi: usize, s: f64) -> usize {
    let hi = hi.max(lo);
    let total: f64 = (lo..=hi).map(|k| (k as f64).powf(-s)).sum();
    let mut x = rng.random::<f64>() * total;
    for k in lo..=hi {
        x -= (k as f64).powf(-s);
        if x <= 0.0 {
            return k;
        }
    }
    hi
}

/// The conversations of `plan`: `directs` rounds of random pairings (repeated pairs are
/// skipped), then `groups` groups of Zipf-distributed size with members drawn at random.
pub fn topology(plan: &Plan, rng: &mut impl Rng) -> Vec<Conv> {
    let n = plan.users;
    let mut convs = Vec::new();
    let mut pairs = std::collections::HashSet::new();
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..plan.directs {
        order.shuffle(rng);
        for pair in order.chunks_exact(2) {
            let (a, b) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            if pairs.insert((a, b)) {
                convs.push(Conv { members: vec![a, b], group: false });
            }
        }
    }
    if n >= 3 {
        for _ in 0..plan.groups {
            let size = zipf(rng, 3, plan.max_group.min(n), plan.zipf);
            let members = rand::seq::index::sample(rng, n, size).into_vec();
            convs.push(Conv { members, group: true });
        }
    }
    convs
}

/// Counters a run adds to the common ones (counted while recording, unless noted).
#[derive(Debug, Default)]
struct Counters {
    reconnects: AtomicU64,
    disconnects: AtomicU64,
    /// Messages that reached a user through resync after a reconnect rather than live.
    recovered: AtomicU64,
    typing_sent: AtomicU64,
    typing_events: AtomicU64,
    reads_sent: AtomicU64,
    receipt_events: AtomicU64,
    presence_events: AtomicU64,
    /// Whole run: entries out of order or repeated (the client promises neither happens).
    order_violations: AtomicU64,
    kills: AtomicU64,
}

fn bump(c: &AtomicU64, shared: &Shared) {
    if shared.recording() {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

fn user_name(ctx: &Ctx, i: usize) -> String {
    format!("{}-u{i}", ctx.run)
}

/// Runs the plan against `target`.
///
/// # Errors
/// When connecting or setting up fails.
pub async fn run(target: &Switchboard, ctx: &Ctx, plan: &Plan) -> anyhow::Result<Report> {
    if plan.users < 2 {
        bail!("{} needs at least 2 users", plan.name);
    }
    let seed = u64::from_str_radix(ctx.run.trim_start_matches("lg"), 16).unwrap_or(1);
    let mut rng = StdRng::seed_from_u64(seed);
    let convs = topology(plan, &mut rng);
    let shared = &ctx.shared;
    let counters = Arc::new(Counters::default());

    // Connect everyone.
    let kills: Vec<Arc<KillSwitch>> = (0..plan.users).map(|_| Arc::default()).collect();
    let sources = ctx.sources();
    let clients: Vec<(Client, EventStream)> = futures::stream::iter(0..plan.users)
        .map(|i| {
            let local = (!sources.is_empty()).then(|| sources[i % sources.len()]);
            connect(target, user_name(ctx, i), local, Arc::clone(&kills[i]))
        })
        .buffered(ctx.common.connect_parallelism.max(1))
        .try_collect()
        .await?;

    // Create the conversations.
    let ids: Vec<String> = futures::stream::iter(convs.iter())
        .map(|c| create(ctx, &clients[c.members[0]].0, c))
        .buffered(ctx.common.connect_parallelism.clamp(1, 64))
        .try_collect()
        .await?;
    let index: Arc<HashMap<String, usize>> =
        Arc::new(ids.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect());
    let mut member_of: Vec<Vec<usize>> = vec![Vec::new(); plan.users];
    for (k, c) in convs.iter().enumerate() {
        for &m in &c.members {
            member_of[m].push(k);
        }
    }

    // Presence: follow a few random others.
    if plan.presence > 0 {
        futures::stream::iter(clients.iter().enumerate())
            .map(|(i, (client, _))| {
                let follow: Vec<String> =
                    rand::seq::index::sample(&mut rng, plan.users, plan.presence.min(plan.users))
                        .into_iter()
                        .filter(|&u| u != i)
                        .map(|u| user_name(ctx, u))
                        .collect();
                async move { client.subscribe_presence(follow).await.map(|_| ()) }
            })
            .buffered(64)
            .try_collect::<Vec<()>>()
            .await
            .context("subscribing to presence")?;
    }

    // Readers, senders, churn.
    let done = CancellationToken::new();
    let acked_max: Arc<Vec<AtomicU64>> =
        Arc::new((0..convs.len()).map(|_| AtomicU64::new(0)).collect());
    let ids = Arc::new(ids);
    let convs = Arc::new(convs);
    let per_user_rate = plan.rate / plan.users as f64;
    let mut readers = Vec::with_capacity(plan.users);
    let mut senders = Vec::with_capacity(plan.users);
    let mut handles = Vec::with_capacity(plan.users);
    for (i, (client, events)) in clients.into_iter().enumerate() {
        readers.push(tokio::spawn(read(Reader {
            me: client.user_id().to_owned(),
            client: client.clone(),
            events,
            index: Arc::clone(&index),
            ids: Arc::clone(&ids),
            shared: Arc::clone(shared),
            counters: Arc::clone(&counters),
            kill: Arc::clone(&kills[i]),
            read_every: plan.read_every,
            done: done.clone(),
        })));
        let mine = std::mem::take(&mut member_of[i]);
        if per_user_rate > 0.0 && !mine.is_empty() {
            senders.push(tokio::spawn(send(Sender {
                me: i as u64,
                client: client.clone(),
                mine,
                convs: Arc::clone(&convs),
                ids: Arc::clone(&ids),
                plan: plan.clone(),
                rate: per_user_rate,
                payload: ctx.load().payload,
                shared: Arc::clone(shared),
                counters: Arc::clone(&counters),
                acked_max: Arc::clone(&acked_max),
                rng: StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            })));
        }
        handles.push(client);
    }
    let churn = (plan.churn_rate > 0.0).then(|| {
        tokio::spawn(churn(
            kills.clone(),
            plan.churn_rate,
            plan.offline,
            Arc::clone(shared),
            Arc::clone(&counters),
            StdRng::seed_from_u64(seed.rotate_left(17)),
        ))
    });

    let window = measure(shared, &ctx.load(), ctx.broker_pid).await;

    // Wind down: stop churning, let sends finish, bring everyone back and sync, then check.
    if let Some(c) = churn {
        let _ = c.await;
    }
    for s in senders {
        let _ = s.await;
    }
    tokio::time::sleep(plan.offline).await;
    for client in &handles {
        let mut tries = 0;
        while let Err(e) = client.sync_now().await {
            tries += 1;
            if tries >= 50 {
                shared.error(&format!("final sync: {e}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.cancel();
    let mut seen = Vec::with_capacity(readers.len());
    for r in readers {
        seen.push(r.await.unwrap_or_default());
    }
    for client in &handles {
        client.close().await;
    }

    let mut missing = 0u64;
    for (k, c) in convs.iter().enumerate() {
        let acked = acked_max[k].load(Ordering::Relaxed);
        for &m in &c.members {
            let got = seen.get(m).and_then(|s| s.get(&k)).copied().unwrap_or(0);
            missing += acked.saturating_sub(got);
        }
    }

    let m = window.finish(shared);
    let groups: Vec<usize> = convs.iter().filter(|c| c.group).map(|c| c.members.len()).collect();
    let directs = convs.len() - groups.len();
    let mut report = Report::new(
        plan.name,
        format!("{} {} (Rust client)", crate::target::Target::name(target), ctx.common.target),
        ctx.parameters(&[
            ("users", plan.users.to_string()),
            ("rate", format!("{}", plan.rate)),
            ("directs_per_user", plan.directs.to_string()),
            ("groups", plan.groups.to_string()),
            ("max_group", plan.max_group.to_string()),
            ("zipf", format!("{}", plan.zipf)),
            ("churn_rate", format!("{}", plan.churn_rate)),
            ("offline", format!("{:?}", plan.offline)),
        ]),
        &m,
        shared.errors(),
    );
    let secs = m.seconds.max(1e-9);
    let c = &counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    report.parameters.remove("in_flight");
    let e = &mut report.extra;
    e.insert("missing".into(), missing as f64);
    e.insert("order_violations".into(), get(&c.order_violations));
    e.insert("direct_conversations".into(), directs as f64);
    if plan.groups > 0 {
        e.insert("groups".into(), groups.len() as f64);
        e.insert(
            "mean_group_size".into(),
            groups.iter().sum::<usize>() as f64 / groups.len().max(1) as f64,
        );
        e.insert("largest_group".into(), groups.iter().copied().max().unwrap_or(0) as f64);
    }
    if plan.churn_rate > 0.0 {
        e.insert("connections_dropped".into(), get(&c.kills));
        e.insert("reconnects".into(), get(&c.reconnects));
        e.insert("disconnects_seen".into(), get(&c.disconnects));
        e.insert("recovered_by_resync".into(), get(&c.recovered));
    }
    if plan.typing > 0.0 {
        e.insert("typing_sent_per_sec".into(), get(&c.typing_sent) / secs);
        e.insert("typing_events_per_sec".into(), get(&c.typing_events) / secs);
    }
    if plan.read_every.is_some() {
        e.insert("mark_read_per_sec".into(), get(&c.reads_sent) / secs);
    }
    e.insert("receipt_events_per_sec".into(), get(&c.receipt_events) / secs);
    if plan.presence > 0 {
        e.insert("presence_events".into(), get(&c.presence_events));
    }
    Ok(report)
}

/// Connects `user`, retrying while the broker rate-limits new connections.
async fn connect(
    target: &Switchboard,
    user: String,
    local: Option<std::net::IpAddr>,
    kill: Arc<KillSwitch>,
) -> anyhow::Result<(Client, EventStream)> {
    let mut attempt = 0;
    loop {
        let b = builder(target, &user, local, Arc::clone(&kill))?;
        match b.connect().await {
            Ok(c) => return Ok(c),
            Err(switchboard_client::Error::Server {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) if attempt < 100 => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.max(50))).await;
            }
            Err(e) if attempt < 3 && e.code().is_none() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("connecting {user}"))),
        }
        attempt += 1;
    }
}

/// Creates `c` as its first member; returns its id.
async fn create(ctx: &Ctx, creator: &Client, c: &Conv) -> anyhow::Result<String> {
    let others: Vec<String> =
        c.members.iter().skip(1).map(|&m| user_name(ctx, m)).collect::<Vec<_>>();
    if !c.group {
        let other = others.first().context("a direct conversation needs two members")?;
        return Ok(creator.create_direct(other).await?.conversation_id);
    }
    let mut chunks = others.chunks(MEMBERS_PER_REQUEST);
    let first = chunks.next().unwrap_or_default().to_vec();
    let conv = creator.create_group("loadgen group", first, HistoryVisibility::Shared).await?;
    for chunk in chunks {
        creator.add_members(&conv.conversation_id, chunk.to_vec()).await?;
    }
    Ok(conv.conversation_id)
}

struct Reader {
    me: String,
    client: Client,
    events: EventStream,
    index: Arc<HashMap<String, usize>>,
    ids: Arc<Vec<String>>,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    kill: Arc<KillSwitch>,
    read_every: Option<Duration>,
    done: CancellationToken,
}

/// Consumes one user's events until `done`; returns the last seq seen per conversation.
async fn read(mut r: Reader) -> HashMap<usize, u64> {
    let mut seen: HashMap<usize, u64> = HashMap::new();
    let mut unread: HashMap<usize, u64> = HashMap::new();
    let mut local = Latencies::default();
    let mut marks: JoinSet<(Instant, Result<(), switchboard_client::Error>)> = JoinSet::new();
    let mut last_connected: Option<Instant> = None;
    let mut tick = tokio::time::interval(r.read_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    loop {
        tokio::select! {
            () = r.done.cancelled() => break,
            _ = tick.tick(), if r.read_every.is_some() => {
                for (k, seq) in unread.drain() {
                    let Some(id) = r.ids.get(k).cloned() else { continue };
                    let client = r.client.clone();
                    bump(&r.counters.reads_sent, &r.shared);
                    marks.spawn(async move {
                        (Instant::now(), client.mark_read(&id, seq).await.map(|_| ()))
                    });
                }
            }
            Some(done) = marks.join_next(), if !marks.is_empty() => {
                if let Ok((started, result)) = done {
                    match result {
                        Ok(()) if r.shared.recording() => local.other("mark_read", started.elapsed()),
                        Ok(()) | Err(switchboard_client::Error::ConnectionLost) => {}
                        Err(e) => r.shared.error(&error_name(&e)),
                    }
                }
            }
            ev = r.events.next() => {
                let Some(ev) = ev else { break };
                match ev {
                    Event::Message(m) => {
                        message(&mut r, &m, &mut seen, &mut unread, &mut local, last_connected);
                    }
                    Event::Connected { reconnect: true, .. } => {
                        let now = Instant::now();
                        bump(&r.counters.reconnects, &r.shared);
                        if let Some(t) = r.kill.attempt_started()
                            && r.shared.recording()
                        {
                            local.other("reconnect", now.saturating_duration_since(t));
                        }
                        last_connected = Some(now);
                    }
                    Event::Disconnected { .. } => bump(&r.counters.disconnects, &r.shared),
                    Event::Typing(_) => bump(&r.counters.typing_events, &r.shared),
                    Event::Receipt(_) => bump(&r.counters.receipt_events, &r.shared),
                    Event::Presence(_) => bump(&r.counters.presence_events, &r.shared),
                    Event::CursorReset { .. } => r.shared.error("cursor reset"),
                    Event::Revoked { .. } => r.shared.error("revoked"),
                    Event::Closed => {
                        r.shared.error("client closed");
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    r.shared.merge(&local);
    seen
}

fn message(
    r: &mut Reader,
    m: &Message,
    seen: &mut HashMap<usize, u64>,
    unread: &mut HashMap<usize, u64>,
    local: &mut Latencies,
    last_connected: Option<Instant>,
) {
    let Some(&k) = r.index.get(&m.conversation_id) else { return };
    let last = seen.entry(k).or_insert(0);
    if m.seq != *last + 1 {
        r.counters.order_violations.fetch_add(1, Ordering::Relaxed);
    }
    *last = (*last).max(m.seq);
    if m.sender == r.me {
        return;
    }
    let Some(switchboard_client::protocol::content::Body::Data(payload)) =
        m.content.as_ref().filter(|c| c.content_type == CONTENT_TYPE).and_then(|c| c.body.as_ref())
    else {
        return;
    };
    let Some((stamp, _)) = crate::target::parse(payload) else { return };
    unread.insert(k, m.seq);
    r.shared.delivered.fetch_add(1, Ordering::Relaxed);
    let sent_at = r.shared.instant(stamp);
    if last_connected.is_some_and(|t| sent_at < t) {
        bump(&r.counters.recovered, &r.shared);
    }
    if r.shared.recording() {
        local.e2e(Instant::now().saturating_duration_since(sent_at));
    }
}

fn error_name(e: &switchboard_client::Error) -> String {
    match e.code() {
        Some(code) => code.as_str_name().to_owned(),
        None => e.to_string(),
    }
}

struct Sender {
    me: u64,
    client: Client,
    mine: Vec<usize>,
    convs: Arc<Vec<Conv>>,
    ids: Arc<Vec<String>>,
    plan: Plan,
    rate: f64,
    payload: usize,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    acked_max: Arc<Vec<AtomicU64>>,
    rng: StdRng,
}

enum Outcome {
    Sent(usize, u64, Result<SendAck, switchboard_client::Error>),
    Typed(Result<(), switchboard_client::Error>),
}

/// One user's open-loop sends until the run stops; waits for the last acks.
async fn send(mut s: Sender) {
    let groups: Vec<usize> = s.mine.iter().copied().filter(|&k| s.convs[k].group).collect();
    let directs: Vec<usize> = s.mine.iter().copied().filter(|&k| !s.convs[k].group).collect();
    let mut local = Latencies::default();
    let mut inflight: JoinSet<Outcome> = JoinSet::new();
    let gap = |rng: &mut StdRng, rate: f64| {
        Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate.max(1e-9))
    };
    let mut due = Instant::now() + gap(&mut s.rng, s.rate);
    while !s.shared.stopping() {
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {
                let pool = if !groups.is_empty()
                    && (directs.is_empty() || s.rng.random::<f64>() < s.plan.group_share)
                {
                    &groups
                } else {
                    &directs
                };
                let k = pool[s.rng.random_range(0..pool.len())];
                let id = s.ids[k].clone();
                if s.rng.random::<f64>() < s.plan.typing {
                    bump(&s.counters.typing_sent, &s.shared);
                    let client = s.client.clone();
                    let id = id.clone();
                    inflight.spawn(async move { Outcome::Typed(client.typing(&id, true).await) });
                }
                let stamp =
                    s.shared.stamp(crate::runner::intended(due, Instant::now(), &s.shared, &mut local));
                let payload = crate::target::payload(stamp, s.me, s.payload);
                let client = s.client.clone();
                inflight.spawn(async move {
                    let r = client.send(&id, Content::data(CONTENT_TYPE, payload)).await;
                    Outcome::Sent(k, stamp, r)
                });
                s.shared.sent.fetch_add(1, Ordering::Relaxed);
                due += gap(&mut s.rng, s.rate);
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Ok(o) = done {
                    outcome(&s, o, &mut local);
                }
            }
            () = s.shared.stop.cancelled() => break,
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN;
    while let Ok(Some(done)) = tokio::time::timeout_at(deadline, inflight.join_next()).await {
        if let Ok(o) = done {
            outcome(&s, o, &mut local);
        }
    }
    if !inflight.is_empty() {
        s.shared.error("send not acknowledged within the drain time");
    }
    s.shared.merge(&local);
}

fn outcome(s: &Sender, o: Outcome, local: &mut Latencies) {
    match o {
        Outcome::Sent(k, stamp, Ok(ack)) => {
            s.acked_max[k].fetch_max(ack.seq, Ordering::Relaxed);
            s.shared.acked.fetch_add(1, Ordering::Relaxed);
            if s.shared.recording() {
                local.ack(Instant::now().saturating_duration_since(s.shared.instant(stamp)));
            }
        }
        Outcome::Sent(_, _, Err(e)) => s.shared.error(&error_name(&e)),
        // Typing is fire-and-forget: one in flight when the connection drops is simply lost.
        Outcome::Typed(Ok(()) | Err(switchboard_client::Error::ConnectionLost)) => {}
        Outcome::Typed(Err(e)) => s.shared.error(&error_name(&e)),
    }
}

/// Drops random online users' connections at `rate` per second until the run stops.
async fn churn(
    kills: Vec<Arc<KillSwitch>>,
    rate: f64,
    offline: Duration,
    shared: Arc<Shared>,
    counters: Arc<Counters>,
    mut rng: StdRng,
) {
    let mut due = Instant::now();
    while !shared.stopping() {
        due += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / rate.max(1e-9));
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {}
            () = shared.stop.cancelled() => break,
        }
        let k = &kills[rng.random_range(0..kills.len())];
        if !k.offline() && k.kill(offline) {
            bump(&counters.kills, &shared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(users: usize, directs: usize, groups: usize) -> Plan {
        Plan {
            name: "chat",
            users,
            directs,
            groups,
            max_group: 50,
            zipf: 1.2,
            group_share: 0.3,
            typing: 0.5,
            read_every: None,
            presence: 0,
            churn_rate: 0.0,
            offline: Duration::from_secs(1),
            rate: 1.0,
        }
    }

    #[test]
    fn given_direct_rounds_should_pair_every_user_without_repeating_a_pair() {
        let mut rng = StdRng::seed_from_u64(7);
        let convs = topology(&plan(100, 3, 0), &mut rng);
        let mut degree = [0usize; 100];
        let mut pairs = std::collections::HashSet::new();
        for c in &convs {
            assert!(!c.group);
            assert_eq!(c.members.len(), 2);
            assert!(pairs.insert((c.members[0], c.members[1])));
            for &m in &c.members {
                degree[m] += 1;
            }
        }
        // Three rounds of pairings; the rare repeated pair is skipped.
        assert!(degree.iter().all(|&d| (1..=3).contains(&d)));
        assert!(convs.len() > 140);
    }

    #[test]
    fn given_zipf_sizes_should_stay_in_bounds_and_favour_small_groups() {
        let mut rng = StdRng::seed_from_u64(9);
        let sizes: Vec<usize> = (0..2000).map(|_| zipf(&mut rng, 3, 200, 2.0)).collect();
        assert!(sizes.iter().all(|&s| (3..=200).contains(&s)));
        let small = sizes.iter().filter(|&&s| s <= 10).count();
        let large = sizes.iter().filter(|&&s| s > 100).count();
        assert!(small > large * 5, "small {small} large {large}");
        assert!(large > 0);
    }

    #[test]
    fn given_groups_should_have_distinct_members_within_the_user_count() {
        let mut rng = StdRng::seed_from_u64(11);
        let convs = topology(&plan(40, 0, 30), &mut rng);
        assert_eq!(convs.len(), 30);
        for c in &convs {
            assert!(c.group);
            assert!((3..=40).contains(&c.members.len()));
            let distinct: std::collections::HashSet<_> = c.members.iter().collect();
            assert_eq!(distinct.len(), c.members.len());
            assert!(c.members.iter().all(|&m| m < 40));
        }
    }
}
