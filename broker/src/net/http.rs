//! The HTTP listener (hyper, HTTP/1.1), on every shard with `SO_REUSEPORT` like the TCP
//! listener.
//!
//! | route | what |
//! |---|---|
//! | `GET /ws` | WebSocket upgrade to the same session logic as TCP ([`super::ws`]) |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 once storage is open, recovery done, listeners bound and (in a cluster) a seeded node has heard from a peer; 503 otherwise or while stopping |
//! | `GET /cluster` | the gossip view as JSON (404 when clustering is off) |
//! | `GET /metrics` | Prometheus text format |
//! | `POST /dev/token` | a development token for `{"user": …}`, only when safe (see config) |
//! | `/admin/…` | the admin API, off unless `http.admin_token` is set ([`super::admin`]) |
//! | `GET /`, `/app.js`, … | the demo chat page and the browser client ([`super::assets`]) |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::assets;
use super::ws::{self, Subprotocol};
use crate::shard::Shard;

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

/// Accepts HTTP connections on this shard's listener until the shard shuts down.
pub async fn accept_loop(shard: Rc<Shard>, listener: tokio::net::TcpListener) {
    loop {
        tokio::select! {
            () = shard.cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // Every HTTP connection holds a connection slot (a WebSocket keeps its
                    // connection's), taken before anything is read from it.
                    match shard.limiters.slots.acquire(peer.ip()) {
                        Ok(slot) => {
                            tokio::task::spawn_local(serve_connection(shard.clone(), stream, peer, slot));
                        }
                        Err(refusal) => {
                            tokio::task::spawn_local(refuse_over_cap(stream, refusal));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Answers a connection over a connection cap with `503` and `Retry-After`, then closes it.
async fn refuse_over_cap(stream: tokio::net::TcpStream, refusal: crate::ratelimit::SlotRefusal) {
    let body = format!("{}\n", refusal.refused());
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    super::write_and_close(stream, response.as_bytes()).await;
}

/// A connection's slot, handed over to its WebSocket when it upgrades.
type SlotCell = Rc<std::cell::RefCell<Option<crate::ratelimit::Slot>>>;

async fn serve_connection(
    shard: Rc<Shard>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: crate::ratelimit::Slot,
) {
    let slot: SlotCell = Rc::new(std::cell::RefCell::new(Some(slot)));
    let service_shard = shard.clone();
    let service = hyper::service::service_fn(move |req| {
        let shard = service_shard.clone();
        let slot = slot.clone();
        async move { Ok::<_, Infallible>(route(&shard, peer, req, &slot).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = shard.cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

async fn route(
    shard: &Rc<Shard>,
    peer: SocketAddr,
    req: Request<Incoming>,
    slot: &SlotCell,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/ws") => upgrade(shard, peer, req, slot),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if let Some(why) = shard.storage.failure() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    format!("storage failed: {why}; stopping (fail-stop)\n"),
                )
            } else if shard.is_shutting_down() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if let Some(why) = shard.cluster.as_ref().and_then(not_ready) {
                text(StatusCode::SERVICE_UNAVAILABLE, why)
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/cluster") => match &shard.cluster {
            Some(c) => respond(StatusCode::OK, "application/json", cluster_json(c, false)),
            None => text(StatusCode::NOT_FOUND, "clustering is off\n"),
        },
        (&Method::GET, "/cluster/partitions") => match &shard.cluster {
            Some(c) => respond(StatusCode::OK, "application/json", cluster_json(c, true)),
            None => text(StatusCode::NOT_FOUND, "clustering is off\n"),
        },
        (&Method::GET, "/metrics") => {
            let body = shard.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
            respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
        }
        (&Method::POST, "/dev/token") => dev_token(shard, req).await,
        (_, p) if p.starts_with("/admin/") => super::admin::route(shard, req).await,
        (&Method::GET | &Method::HEAD, _) => match assets::get(&path) {
            Some((content_type, body)) => {
                respond(StatusCode::OK, content_type, Bytes::from_static(body))
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

/// Why a clustered node is not ready, if it is not.
fn not_ready(c: &crate::shard::ClusterView) -> Option<&'static str> {
    if c.gossip.borrow().self_removed() {
        return Some("removed from the cluster: this node serves nothing; stop it\n");
    }
    if !c.gossip.borrow().joined() {
        return Some("not joined: no peer reachable through the seeds\n");
    }
    if !c.control.borrow().ready() {
        return Some("no control plane yet: waiting for a leader and the partition table\n");
    }
    None
}

/// `/cluster`: gossip's view plus the control plane's summary; with `table`, the whole
/// partition table instead of the summary.
fn cluster_json(c: &crate::shard::ClusterView, table: bool) -> Vec<u8> {
    let gossip = c.gossip.borrow().clone();
    let control = c.control.borrow().clone();
    let partitions = &control.machine.table.partitions;
    let body = if table {
        serde_json::json!({
            "leader": control.leader,
            "term": control.term,
            "partitions": partitions,
        })
    } else {
        let mut view = serde_json::to_value(&*gossip).unwrap_or_default();
        let led: std::collections::BTreeMap<String, usize> =
            control.machine.table.led().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        view["control"] = serde_json::json!({
            "leader": control.leader,
            "term": control.term,
            "voters": control.voters,
            "learners": control.learners,
            "partitions": partitions.len(),
            "max_epoch": partitions.iter().map(|a| a.epoch).max().unwrap_or(0),
            "led": led,
            "removed": control.machine.table.removed,
        });
        view["replication"] = serde_json::to_value(&*c.replication.borrow()).unwrap_or_default();
        view
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Same-origin, or listed in `http.allowed_origins`; clients without `Origin` (not browsers)
/// are allowed.
fn origin_allowed(shard: &Shard, req: &Request<Incoming>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let allowed = &shard.config.http.allowed_origins;
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    !host.is_empty()
        && (origin.eq_ignore_ascii_case(&format!("http://{host}"))
            || origin.eq_ignore_ascii_case(&format!("https://{host}")))
}

fn upgrade(
    shard: &Rc<Shard>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    slot: &SlotCell,
) -> Response<Body> {
    if !header_has(&req, header::UPGRADE, "websocket")
        || !header_has(&req, header::CONNECTION, "upgrade")
    {
        return text(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required\n");
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v != "13") {
        return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13\n");
    }
    let Some(key) =
        req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes()))
    else {
        return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key missing\n");
    };
    if !origin_allowed(shard, &req) {
        tracing::info!(%peer, "websocket origin refused");
        return text(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    let proto = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(Subprotocol::from_name);
    let Some(proto) = proto else {
        return text(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Protocol must offer switchboard.v1.proto or switchboard.v1.json\n",
        );
    };
    if let Err(wait) = shard.limiters.connect.check(&peer.ip()) {
        metrics::counter!(crate::metrics::RATE_LIMITED, "limit" => "connection").increment(1);
        let mut r = text(StatusCode::TOO_MANY_REQUESTS, "too many new connections\n");
        let secs = wait.as_secs().max(1).to_string();
        if let Ok(v) = HeaderValue::from_str(&secs) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let upgrading = hyper::upgrade::on(&mut req);
    let shard = shard.clone();
    // The WebSocket keeps the HTTP connection's slot for as long as it lives.
    let slot = slot.borrow_mut().take();
    tokio::task::spawn_local(async move {
        let _slot = slot;
        match upgrading.await {
            Ok(upgraded) => ws::serve(shard, TokioIo::new(upgraded), peer, proto).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(proto.name()));
    r
}

/// `POST /dev/token` with `{"user": "alice"}`: a 24-hour token, when development tokens are on.
async fn dev_token(shard: &Rc<Shard>, req: Request<Incoming>) -> Response<Body> {
    let Some(minter) = shard.dev_minter.as_ref() else {
        return text(StatusCode::NOT_FOUND, "development tokens are off\n");
    };
    let body = match Limited::new(req.into_body(), 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
    };
    let user = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("user").and_then(|u| u.as_str()).map(str::to_owned));
    let Some(user) = user else {
        return text(StatusCode::BAD_REQUEST, "expected {\"user\": \"<user id>\"}\n");
    };
    match minter.mint(&user, Duration::from_secs(24 * 3600)) {
        Ok(token) => respond(
            StatusCode::OK,
            "application/json",
            serde_json::json!({ "user": user, "token": token }).to_string(),
        ),
        Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", format!("{e}\n")),
    }
}
