//! The admin API under `/admin/` on the HTTP port. It is off (404) unless `http.admin_token`
//! is set, and every request carries `Authorization: Bearer <token>` (401 otherwise). Answers
//! are JSON.
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/stats` | this node: version, uptime, connections, sessions and mailbox depth per shard, storage (size, free space, full, durability) |
//! | `GET /admin/users/{user}/sessions` | the user's sessions on every live node: node, shard, id, transport, address, client, connected at, conversations received, bytes queued |
//! | `POST /admin/users/{user}/disconnect` | closes the user's sessions (every node; `?session=<shard>.<id>` for one, with `&node=<n>` in a cluster) with `Disconnect{closed_by_admin}`; answers how many |
//! | `GET /admin/conversations/{id}` | kind, name, creator, created at, members, newest seq and its time, partition, epoch, and `node`: the node that answered (in a cluster, the one serving the conversation) |
//! | `POST /admin/conversations/{id}/members/{user}/remove` | removes a member from a group as an operator (no membership check): a `MembersRemoved` entry with an empty sender; the member's live deliveries stop at once |
//! | `POST /admin/cluster/nodes/{id}/remove` | removes node `id` from the cluster for good: its copies move to the other nodes, then it leaves the Raft group (202 with its state; 404 unknown node; 409 when fewer nodes than `cluster.replication` would remain) |
//!
//! In a cluster, session routes fan out to every live node (each answers for its own sessions,
//! marked with its `node`), and conversation routes are relayed to the node leading the
//! conversation's partition, all with the caller's token (every node needs the same
//! `http.admin_token`). Requests carrying `local=1` are answered by the node alone.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use serde::Serialize;
use switchboard_protocol::{DisconnectReason, ServerFrame, SharedFrame};
use tokio::sync::oneshot;

use crate::cluster::control::{REMOVE_PATH, RemoveRequest};
use crate::shard::{OwnerMsg, OwnerOp, SessionRef, Shard, ShardMsg};

type Body = Full<Bytes>;

fn reply(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    reply(status, &serde_json::json!({ "error": message }))
}

/// Whether the request carries the configured token (compared in constant time).
fn authorized(token: &str, req: &Request<Incoming>) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Serves a request whose path starts with `/admin/`.
pub async fn route(shard: &Rc<Shard>, req: Request<Incoming>) -> Response<Body> {
    let Some(token) = &shard.config.http.admin_token else {
        return error(StatusCode::NOT_FOUND, "the admin API is off (set http.admin_token)");
    };
    if !authorized(token, &req) {
        metrics::counter!(crate::metrics::ADMIN_UNAUTHORIZED).increment(1);
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let path = req.uri().path().to_owned();
    let Some(query) = Query::parse(req.uri().query()) else {
        return error(StatusCode::BAD_REQUEST, "a query part is not UTF-8 once decoded");
    };
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    // Segments are split first, then percent-decoded (`alice%40example.com`, `dm%3Aa%3Ab`).
    let Some(decoded) = path.trim_matches('/').split('/').map(decode).collect::<Option<Vec<_>>>()
    else {
        return error(StatusCode::BAD_REQUEST, "a path segment is not UTF-8 once decoded");
    };
    let parts: Vec<&str> = decoded.iter().map(|s| &**s).collect();
    let relay = Relay { path: &path, query: &query, auth: auth.as_ref() };
    match (req.method(), parts.as_slice()) {
        (&Method::GET, ["admin", "stats"]) => reply(StatusCode::OK, &stats(shard).await),
        (&Method::GET, ["admin", "users", user, "sessions"]) => sessions(shard, user, &relay).await,
        (&Method::POST, ["admin", "users", user, "disconnect"]) => {
            disconnect(shard, user, &relay).await
        }
        (&Method::GET, ["admin", "conversations", id]) => {
            conversation(shard, id, &relay, Method::GET).await
        }
        (&Method::POST, ["admin", "conversations", id, "members", user, "remove"]) => {
            force_remove(shard, id, user, &relay).await
        }
        #[cfg(feature = "failpoints")]
        (&Method::PUT | &Method::DELETE, ["admin", "failpoints", name]) => {
            failpoint(req, name).await
        }
        (_, ["admin", "stats" | "users" | "conversations", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "wrong method for this route")
        }
        (&Method::POST, ["admin", "cluster", "nodes", id, "remove"]) => match id.parse() {
            Ok(node) => remove_node(shard, node).await,
            Err(_) => error(StatusCode::BAD_REQUEST, "node ids are numbers"),
        },
        (_, ["admin", "cluster", "nodes", _, "remove"]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        _ => error(StatusCode::NOT_FOUND, "no such admin route"),
    }
}

/// Hands the removal to the control plane's leader (over the peer port) and relays its answer.
async fn remove_node(shard: &Shard, node: crate::cluster::NodeId) -> Response<Body> {
    let Some(cluster) = &shard.cluster else {
        return error(StatusCode::NOT_FOUND, "clustering is off");
    };
    let control = cluster.control.borrow().clone();
    let Some(leader) = control.leader else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no control plane leader: retry");
    };
    let addr = control.machine.membership.membership().get_node(&leader).map(|n| n.addr.clone());
    let (Some(addr), Some(client)) = (addr, shard.peer_client()) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the control leader is unreachable: retry");
    };
    tracing::info!(node, leader, "admin: removing a node");
    let body = serde_json::to_vec(&RemoveRequest { node }).unwrap_or_default();
    let sent = client
        .post(format!("http://{addr}{REMOVE_PATH}"))
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    let answered = match sent {
        Ok(r) => {
            let status = StatusCode::from_u16(r.status().as_u16()).ok();
            r.bytes().await.ok().zip(status)
        }
        Err(e) => {
            tracing::warn!(error = %e, "admin: the control leader did not answer");
            None
        }
    };
    match answered {
        // The leader changed between the lookup and the request: the client retries.
        Some((_, StatusCode::MISDIRECTED_REQUEST)) | None => {
            error(StatusCode::SERVICE_UNAVAILABLE, "the control leader did not answer: retry")
        }
        Some((body, status)) => {
            let body = serde_json::from_slice(&body).unwrap_or_default();
            reply(status, &body)
        }
    }
}

/// A percent-decoded path segment or query part; `None` when not UTF-8 once decoded.
fn decode(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok()
}

/// The query string's pairs, percent-decoded.
#[derive(Debug, Default)]
struct Query(HashMap<String, String>);

impl Query {
    /// `None` when a part is not UTF-8 once decoded (refused: dropping it could widen the
    /// request, as a `disconnect` without its `session`).
    fn parse(q: Option<&str>) -> Option<Self> {
        q.unwrap_or_default()
            .split('&')
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| Some((decode(k)?.into_owned(), decode(v)?.into_owned())))
            .collect::<Option<HashMap<_, _>>>()
            .map(Self)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// Asked of this node alone (a relay from another node).
    fn local(&self) -> bool {
        self.get("local") == Some("1")
    }
}

/// What a relayed query string escapes.
const QUERY_ESCAPED: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// What a relay to other nodes repeats of the request.
struct Relay<'a> {
    path: &'a str,
    query: &'a Query,
    auth: Option<&'a HeaderValue>,
}

impl Relay<'_> {
    /// Sends the same request to node `http` with `local=1`; its status and JSON body.
    async fn send(
        &self,
        shard: &Shard,
        http: std::net::SocketAddr,
        method: &Method,
    ) -> Option<(StatusCode, serde_json::Value)> {
        let client = shard.peer_client()?;
        let mut query: Vec<String> = self
            .query
            .0
            .iter()
            .filter(|(k, _)| k.as_str() != "local")
            .map(|(k, v)| {
                let encode = |s| percent_encoding::utf8_percent_encode(s, QUERY_ESCAPED);
                format!("{}={}", encode(k), encode(v))
            })
            .collect();
        query.push("local=1".to_owned());
        let url = format!("http://{http}{}?{}", self.path, query.join("&"));
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).ok()?;
        let mut request = client.request(method, url).timeout(Duration::from_secs(5));
        if let Some(auth) = self.auth.and_then(|v| v.to_str().ok()) {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%http, error = %e, "admin: a node did not answer a relayed request");
                return None;
            }
        };
        let status = StatusCode::from_u16(response.status().as_u16()).ok()?;
        let body = response.bytes().await.ok()?;
        Some((status, serde_json::from_slice(&body).unwrap_or_default()))
    }

    /// Sends the request to every other live node (only `only` when given) at once; their
    /// answers, by node.
    async fn to_all(
        &self,
        shard: &Shard,
        method: &Method,
        only: Option<crate::cluster::NodeId>,
    ) -> Vec<(crate::cluster::NodeId, Option<(StatusCode, serde_json::Value)>)> {
        let nodes: Vec<_> =
            other_nodes(shard).into_iter().filter(|(n, _)| only.is_none_or(|o| o == *n)).collect();
        let answers = futures::future::join_all(
            nodes.iter().map(|(_, http)| self.send(shard, *http, method)),
        )
        .await;
        nodes.into_iter().map(|(n, _)| n).zip(answers).collect()
    }
}

/// The other live nodes' ids and HTTP addresses (none when clustering is off).
fn other_nodes(shard: &Shard) -> Vec<(crate::cluster::NodeId, std::net::SocketAddr)> {
    let Some(c) = &shard.cluster else { return Vec::new() };
    let view = c.gossip.borrow().clone();
    view.members
        .iter()
        .filter(|m| m.id != view.self_id && m.live)
        .filter_map(|m| m.http.map(|h| (m.id, h)))
        .collect()
}

/// This node's cluster id (0 when clustering is off).
fn node_id(shard: &Shard) -> crate::cluster::NodeId {
    shard.cluster.as_ref().map_or(0, |c| c.gossip.borrow().self_id)
}

/// When the process started serving, for the uptime in stats.
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Marks the start of serving (the runtime calls it once listeners are up).
pub fn mark_started() {
    let _ = STARTED.set(Instant::now());
}

/// A request from the admin API to every shard, answered through its channel.
#[derive(Debug)]
pub enum AdminMsg {
    /// The sessions this shard hosts (of `user`, or all).
    Sessions {
        /// Only this user's, when given.
        user: Option<Arc<str>>,
        /// The answer.
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// Closes sessions of `user` (only session `id` when given) with `closed_by_admin`.
    Disconnect {
        /// Whose.
        user: Arc<str>,
        /// Only this one (an id on this shard).
        id: Option<u64>,
        /// How many were closed.
        reply: oneshot::Sender<usize>,
    },
    /// The shard's figures.
    Stats {
        /// The answer.
        reply: oneshot::Sender<ShardInfo>,
    },
}

/// One session, as the admin API lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// The node hosting it (0 when clustering is off).
    pub node: crate::cluster::NodeId,
    /// The shard hosting it.
    pub shard: usize,
    /// Its id on that shard.
    pub id: u64,
    /// `<shard>.<id>`, for `disconnect?session=`.
    pub session: String,
    /// Whose.
    pub user: String,
    /// `tcp` or `ws`.
    pub transport: &'static str,
    /// The client's address.
    pub address: String,
    /// `Hello.client` (at most 64 characters).
    pub client: String,
    /// When the handshake completed (ms since the epoch).
    pub connected_at_ms: u64,
    /// Conversations it receives live.
    pub conversations: usize,
    /// Bytes queued toward it, not yet written.
    pub queued_bytes: usize,
}

/// One shard's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ShardInfo {
    /// Its index.
    pub shard: usize,
    /// Sessions it hosts.
    pub sessions: usize,
    /// Users homed on it with a session on this node.
    pub online_users: usize,
    /// Conversations its owner role holds in memory.
    pub conversations_loaded: usize,
    /// Messages waiting in its mailbox.
    pub mailbox_depth: usize,
}

/// Answers an admin request on the shard that received it (the shard's mailbox loop).
pub(crate) fn on_shard(shard: &Rc<Shard>, msg: AdminMsg) {
    match msg {
        AdminMsg::Sessions { user, reply } => {
            let node = node_id(shard);
            let local = shard.local.borrow();
            let list = local
                .sessions_of(user.as_deref())
                .map(|s| SessionInfo {
                    node,
                    shard: shard.id,
                    id: s.id,
                    session: format!("{}.{}", shard.id, s.id),
                    user: s.user.to_string(),
                    transport: s.meta.transport.label(),
                    address: s.meta.peer.to_string(),
                    client: s.meta.client.clone(),
                    connected_at_ms: s.meta.connected_at_ms,
                    conversations: s.conversation_count(),
                    queued_bytes: s.out.queued_bytes(),
                })
                .collect();
            let _ = reply.send(list);
        }
        AdminMsg::Disconnect { user, id, reply } => {
            let closing: Vec<_> = shard
                .local
                .borrow()
                .sessions_of(Some(&user))
                .filter(|s| id.is_none_or(|id| s.id == id))
                .cloned()
                .collect();
            for s in &closing {
                tracing::info!(user = %s.user, session = s.id, "admin: closing a session");
                s.out.finish_with(ServerFrame::disconnect(
                    DisconnectReason::ClosedByAdmin,
                    "closed by an operator",
                    0,
                ));
            }
            let _ = reply.send(closing.len());
        }
        AdminMsg::Stats { reply } => {
            let _ = reply.send(ShardInfo {
                shard: shard.id,
                sessions: shard.local.borrow().session_count(),
                online_users: shard.home.borrow().online_users(),
                conversations_loaded: shard.owner.borrow().loaded(),
                mailbox_depth: shard.mailbox_depth(),
            });
        }
    }
}

/// Asks every shard of this node and gathers the answers (a shard that does not answer within
/// 5 s is left out).
async fn ask_shards<T>(shard: &Shard, ask: impl Fn(oneshot::Sender<T>) -> AdminMsg) -> Vec<T> {
    let mut waiting = Vec::with_capacity(shard.count);
    for target in 0..shard.count {
        let (tx, rx) = oneshot::channel();
        shard.send(target, ShardMsg::Admin(ask(tx)));
        waiting.push(rx);
    }
    let gathered = tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(waiting));
    gathered.await.unwrap_or_default().into_iter().filter_map(Result::ok).collect()
}

async fn stats(shard: &Shard) -> serde_json::Value {
    let shards = ask_shards(shard, |reply| AdminMsg::Stats { reply }).await;
    let storage = shard.storage.clone();
    let (used, free) =
        tokio::task::spawn_blocking(move || (storage.disk_space(), storage.free_bytes().ok()))
            .await
            .unwrap_or_default();
    serde_json::json!({
        "node": node_id(shard),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": STARTED.get().map_or(0, |t| t.elapsed().as_secs()),
        "connections": crate::metrics::open_connections(),
        "sessions": shards.iter().map(|s| s.sessions).sum::<usize>(),
        "online_users": shards.iter().map(|s| s.online_users).sum::<usize>(),
        "shards": shards,
        "storage": {
            "durability": shard.config.storage.durability.to_string(),
            "used_bytes": used,
            "free_bytes": free,
            "min_free_bytes": shard.config.storage.min_free_mb << 20,
            "full": shard.storage.is_full(),
            "failed": shard.storage.is_poisoned(),
        },
        "shutting_down": shard.is_shutting_down(),
    })
}

fn valid_user(user: &str) -> Result<(), Box<Response<Body>>> {
    switchboard_protocol::validate::user_id(user)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &e.to_string())))
}

async fn sessions(shard: &Shard, user: &str, relay: &Relay<'_>) -> Response<Body> {
    if let Err(r) = valid_user(user) {
        return *r;
    }
    let who: Arc<str> = Arc::from(user);
    let mut list: Vec<SessionInfo> =
        ask_shards(shard, |reply| AdminMsg::Sessions { user: Some(who.clone()), reply })
            .await
            .into_iter()
            .flatten()
            .collect();
    let mut others = serde_json::Map::new();
    let mut unreachable = Vec::new();
    if !relay.query.local() {
        for (node, answer) in relay.to_all(shard, &Method::GET, None).await {
            match answer {
                Some((StatusCode::OK, body)) => {
                    others.insert(node.to_string(), body["sessions"].clone());
                }
                _ => unreachable.push(node),
            }
        }
    }
    list.sort_by_key(|s| (s.node, s.shard, s.id));
    let mut sessions = serde_json::to_value(&list).unwrap_or_default();
    if let Some(all) = sessions.as_array_mut() {
        for (_, theirs) in others {
            if let serde_json::Value::Array(theirs) = theirs {
                all.extend(theirs);
            }
        }
    }
    reply(
        StatusCode::OK,
        &serde_json::json!({ "user": user, "sessions": sessions, "unreachable_nodes": unreachable }),
    )
}

async fn disconnect(shard: &Shard, user: &str, relay: &Relay<'_>) -> Response<Body> {
    if let Err(r) = valid_user(user) {
        return *r;
    }
    // `session=<shard>.<id>`: one session; with `node=<n>` in a cluster, on that node.
    let one = match relay.query.get("session") {
        None => None,
        Some(s) => {
            match s.split_once('.').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))) {
                Some(pair) => Some(pair),
                None => return error(StatusCode::BAD_REQUEST, "session is <shard>.<id>"),
            }
        }
    };
    let node: Option<crate::cluster::NodeId> = match relay.query.get("node").map(str::parse) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "node ids are numbers"),
    };
    let me = node_id(shard);
    if shard.cluster.is_some() && one.is_some() && node.is_none() {
        // Session ids are per node: the same `<shard>.<id>` names other sessions elsewhere.
        return error(StatusCode::BAD_REQUEST, "in a cluster, name the session's node: node=<n>");
    }
    if let Some(n) = node
        && n != me
        && !other_nodes(shard).iter().any(|(id, _)| *id == n)
    {
        return error(StatusCode::NOT_FOUND, "no such live node");
    }
    let mut closed = 0;
    if node.is_none_or(|n| n == me) {
        let who: Arc<str> = Arc::from(user);
        closed += match one {
            Some((target, id)) if target < shard.count => {
                let (tx, rx) = oneshot::channel();
                shard.send(
                    target,
                    ShardMsg::Admin(AdminMsg::Disconnect { user: who, id: Some(id), reply: tx }),
                );
                rx.await.unwrap_or(0)
            }
            Some(_) => 0,
            None => ask_shards(shard, |reply| AdminMsg::Disconnect {
                user: who.clone(),
                id: None,
                reply,
            })
            .await
            .into_iter()
            .sum(),
        };
    }
    let mut unreachable = Vec::new();
    if !relay.query.local() {
        for (other, answer) in relay.to_all(shard, &Method::POST, node).await {
            match answer {
                Some((StatusCode::OK, body)) => {
                    closed +=
                        usize::try_from(body["disconnected"].as_u64().unwrap_or(0)).unwrap_or(0);
                }
                _ => unreachable.push(other),
            }
        }
    }
    reply(
        StatusCode::OK,
        &serde_json::json!({ "user": user, "disconnected": closed, "unreachable_nodes": unreachable }),
    )
}

/// Where a conversation's admin request is answered: here, or relayed to the partition's
/// leader. `Err` is the answer to give.
fn serve_here(
    shard: &Shard,
    partition: u16,
    relay: &Relay<'_>,
) -> Result<bool, Box<Response<Body>>> {
    let Some(c) = &shard.cluster else { return Ok(true) };
    if c.routing.partitions.serving(partition).is_some() {
        return Ok(true);
    }
    if relay.query.local() {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node does not serve the conversation (it moved): retry",
        )));
    }
    Ok(false)
}

/// Relays a conversation request to the partition's leader.
async fn to_leader(
    shard: &Shard,
    partition: u16,
    relay: &Relay<'_>,
    method: &Method,
) -> Response<Body> {
    let leader = shard.cluster.as_ref().and_then(|c| c.routing.partitions.leader(partition));
    let http = leader.and_then(|l| {
        let view = shard.cluster.as_ref()?.gossip.borrow().clone();
        view.members.iter().find(|m| m.id == l && m.live).and_then(|m| m.http)
    });
    let Some(http) = http else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the conversation has no live leader: retry",
        );
    };
    match relay.send(shard, http, method).await {
        Some((status, body)) => reply(status, &body),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the conversation's leader did not answer: retry",
        ),
    }
}

async fn conversation(
    shard: &Shard,
    id: &str,
    relay: &Relay<'_>,
    method: Method,
) -> Response<Body> {
    if let Err(e) = switchboard_protocol::validate::conversation_id(id) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    let partition = crate::shard::partition(id);
    match serve_here(shard, partition, relay) {
        Err(r) => return *r,
        Ok(false) => return to_leader(shard, partition, relay, &method).await,
        Ok(true) => {}
    }
    let storage = shard.storage.clone();
    let conv = id.to_owned();
    let read = tokio::task::spawn_blocking(move || {
        let r = storage.reader();
        let Some(row) = r.conversation(&conv)? else { return Ok(None) };
        let head = r.head(partition, &conv)?;
        Ok::<_, crate::storage::StorageError>(Some((row, head)))
    })
    .await;
    let (row, head) = match read {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return error(StatusCode::NOT_FOUND, "no such conversation"),
        Ok(Err(e)) => {
            let (_, message) = e.report();
            return error(StatusCode::INTERNAL_SERVER_ERROR, message);
        }
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "read task failed"),
    };
    let (head_seq, messages, last_at) = head.map_or((0, 0, 0), |(seq, entry)| {
        use prost::Message as _;
        let at = switchboard_protocol::Message::decode(entry.message).map_or(0, |m| m.timestamp_ms);
        (seq, entry.ordinal, at)
    });
    let kind =
        switchboard_protocol::ConversationKind::try_from(row.kind).map_or("unknown", |k| match k {
            switchboard_protocol::ConversationKind::Direct => "direct",
            switchboard_protocol::ConversationKind::Group => "group",
            _ => "unknown",
        });
    reply(
        StatusCode::OK,
        &serde_json::json!({
            "id": id,
            "kind": kind,
            "name": row.name,
            "created_by": row.created_by,
            "created_at_ms": row.created_at_ms,
            "members": row.member_count,
            "head_seq": head_seq,
            "messages": messages,
            "last_entry_at_ms": last_at,
            "partition": partition,
            "epoch": row.epoch,
            "node": node_id(shard),
        }),
    )
}

async fn force_remove(
    shard: &Rc<Shard>,
    id: &str,
    user: &str,
    relay: &Relay<'_>,
) -> Response<Body> {
    if let Err(e) = switchboard_protocol::validate::conversation_id(id) {
        return error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    if let Err(r) = valid_user(user) {
        return *r;
    }
    let partition = crate::shard::partition(id);
    match serve_here(shard, partition, relay) {
        Err(r) => return *r,
        Ok(false) => return to_leader(shard, partition, relay, &Method::POST).await,
        Ok(true) => {}
    }
    tracing::info!(conversation = id, user, "admin: removing a member");
    let (tx, rx) = oneshot::channel::<SharedFrame>();
    let stand_in = shard.next_session_id();
    shard.local.borrow_mut().insert_remote(stand_in, tx);
    let op = OwnerOp::ForceRemove(switchboard_protocol::RemoveMembers {
        conversation_id: id.to_owned(),
        users: vec![user.to_owned()],
    });
    shard.to_owner(
        id,
        OwnerMsg::Request {
            from: SessionRef { shard: shard.id, id: stand_in },
            user: Arc::from(""),
            request_id: 1,
            op,
            // Answered here or refused: an operator's removal is never forwarded.
            forwarded: true,
        },
    );
    let answer = match tokio::time::timeout(Duration::from_secs(10), rx).await {
        Ok(Ok(frame)) => frame,
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no answer from the conversation's owner: retry",
            );
        }
    };
    use prost::Message as _;
    use switchboard_protocol::server_frame::Kind;
    match ServerFrame::decode(answer.payload()).ok().and_then(|f| f.kind) {
        Some(Kind::Membership(m)) => reply(
            StatusCode::OK,
            &serde_json::json!({ "conversation": id, "removed": m.changed, "seq": m.seq }),
        ),
        Some(Kind::Error(e)) => {
            let status = match switchboard_protocol::ErrorCode::try_from(e.code) {
                Ok(switchboard_protocol::ErrorCode::NotFound) => StatusCode::NOT_FOUND,
                Ok(switchboard_protocol::ErrorCode::BadRequest) => StatusCode::CONFLICT,
                Ok(
                    switchboard_protocol::ErrorCode::Unavailable
                    | switchboard_protocol::ErrorCode::NotLeader,
                ) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, &e.message)
        }
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "unexpected answer from the owner"),
    }
}

/// The environment variable (value `1`) that enables the failpoint routes of a test build.
#[cfg(feature = "failpoints")]
pub const FAILPOINTS_API_ENV: &str = "SWITCHBOARD_TEST_FAILPOINTS";

/// `PUT /admin/failpoints/{name}` (body: the actions, e.g. `pause` or `return`) and `DELETE`
/// (lifts it): test builds only (the `failpoints` feature), behind the admin token.
#[cfg(feature = "failpoints")]
async fn failpoint(req: Request<Incoming>, name: &str) -> Response<Body> {
    use http_body_util::BodyExt as _;
    // A second guard besides the build feature: the test harness opts in per process.
    if std::env::var_os(FAILPOINTS_API_ENV).is_none_or(|v| v != "1") {
        return error(StatusCode::NOT_FOUND, "failpoints are not enabled in this process");
    }
    let name = name.to_owned();
    if req.method() == Method::DELETE {
        fail::remove(&name);
        tracing::warn!(failpoint = %name, "failpoint lifted");
        return reply(StatusCode::OK, &serde_json::json!({ "failpoint": name, "actions": null }));
    }
    let body = match http_body_util::Limited::new(req.into_body(), 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "unreadable body"),
    };
    let actions = String::from_utf8_lossy(&body).trim().to_owned();
    match fail::cfg(&name, &actions) {
        Ok(()) => {
            tracing::warn!(failpoint = %name, %actions, "failpoint set");
            reply(StatusCode::OK, &serde_json::json!({ "failpoint": name, "actions": actions }))
        }
        Err(e) => error(StatusCode::BAD_REQUEST, &e),
    }
}
