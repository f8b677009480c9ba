//! The admin API under `/admin/` on the HTTP port. It is off (404) unless `http.admin_token`
//! is set, and every request carries `Authorization: Bearer <token>` (401 otherwise). Answers
//! are JSON.
//!
//! | route | what |
//! |---|---|
//! | `POST /admin/cluster/nodes/{id}/remove` | removes node `id` from the cluster for good: its copies move to the other nodes, then it leaves the Raft group (202 with its state; 404 unknown node; 409 when fewer nodes than `cluster.replication` would remain) |

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::cluster::control::{REMOVE_PATH, RemoveRequest};
use crate::shard::Shard;

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
pub async fn route(shard: &Shard, req: Request<Incoming>) -> Response<Body> {
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
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), parts.as_slice()) {
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
