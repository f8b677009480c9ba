//! `Hello` → `Welcome`: authenticate, register the session with the user's home shard,
//! subscribe it to the user's conversations, and (with `resume`) compute the first sync page.
//!
//! The order matters. The home shard acknowledges the session *before* the membership index
//! is read, so a membership change committed after that read is forwarded to this session by
//! the home shard. The owners confirm the subscriptions *before* the resume page is read, so
//! every entry is either in that page or delivered live (or both: the client rule drops the
//! duplicate). Deliveries that arrive during the handshake queue behind a hold; the Welcome
//! is put in front of them.

use std::rc::Rc;
use std::sync::Arc;

use switchboard_protocol::{
    DisconnectReason, ErrorCode, Hello, Limits, PROTOCOL_VERSION, ServerFrame, SyncPage, Welcome,
    server_frame, validate,
};
use tokio::sync::oneshot;

use super::userread::{UserRead, UserReadReply, gather};
use super::{Reject, sync};
use crate::net::session::Session;
use crate::shard::local::{LocalSession, close_session, subscribe};
use crate::shard::owner::now_ms;
use crate::shard::{HomeMsg, SessionRef};
use crate::storage::Reader;

/// Capabilities announced in `Welcome`.
pub const CAPABILITIES: &[&str] = &[
    "direct",
    "groups",
    "history",
    "sync",
    "idempotent-send",
    "membership-feed",
    "multi-device",
    "receipts",
    "typing",
    "presence",
    "rate-limits",
    "token-refresh",
];

/// Runs `read` on a blocking thread against the durable snapshot.
async fn read<T, F>(session: &Session, read: F) -> Result<T, Reject>
where
    T: Send + 'static,
    F: FnOnce(&Reader) -> Result<T, Reject> + Send + 'static,
{
    let storage = session.shard.storage.clone();
    tokio::task::spawn_blocking(move || read(&storage.reader()))
        .await
        .unwrap_or_else(|_| Err(Reject::new(ErrorCode::Internal, "internal error")))
}

/// Performs the handshake; `None` means the connection is closing (the reason is queued).
pub async fn handshake(
    session: &Session,
    request_id: u64,
    hello: Hello,
) -> Option<Rc<LocalSession>> {
    let shard = &session.shard;
    if hello.protocol_version != PROTOCOL_VERSION {
        session.fail(
            request_id,
            ErrorCode::ProtocolVersion,
            &format!(
                "protocol version {} is not supported (this broker speaks {PROTOCOL_VERSION})",
                hello.protocol_version
            ),
            DisconnectReason::ProtocolError,
        );
        return None;
    }
    if shard.cluster.as_ref().is_some_and(|c| c.gossip.borrow().self_removed()) {
        session.fail(
            request_id,
            ErrorCode::Unavailable,
            "this node was removed from the cluster: connect to another node",
            DisconnectReason::Shutdown,
        );
        return None;
    }
    let (user, token_deadline_ms): (Arc<str>, u64) = match shard.auth.verify(&hello.token) {
        Ok(v) => (
            Arc::from(v.user),
            crate::auth::session_deadline_ms(v.expires_at, shard.auth.leeway_secs()),
        ),
        Err(e) => {
            tracing::info!(peer = %session.peer, reason = %e, "authentication failed");
            // An Error with the typed reason (TOKEN_EXPIRED for an expired token), then
            // Disconnect AUTH_FAILED whatever the reason, as before.
            session.out.push(switchboard_protocol::Encoded::of(&e.to_frame(request_id)));
            session.close(DisconnectReason::AuthFailed, &e.to_string());
            return None;
        }
    };
    let token_expires_at_ms =
        token_deadline_ms.saturating_sub(shard.auth.leeway_secs().saturating_mul(1000));
    let resume = hello.resume;
    if let Some(Err(r)) = resume.as_ref().map(sync::check) {
        session.fail(request_id, r.code, &r.message, DisconnectReason::ProtocolError);
        return None;
    }

    if !hello.client.is_empty() {
        tracing::debug!(client = %hello.client.chars().take(64).collect::<String>(), "hello");
    }
    session.out.hold();
    let id = shard.next_session_id();
    let me = SessionRef { shard: shard.id, id };
    let meta = crate::shard::local::SessionMeta {
        transport: session.transport,
        peer: session.peer,
        client: hello.client.chars().take(64).collect(),
        connected_at_ms: crate::shard::owner::now_ms(),
    };
    let local = Rc::new(LocalSession::new(
        id,
        user.clone(),
        meta,
        session.out.clone(),
        session.cancel.clone(),
    ));
    local.set_token_deadline(token_deadline_ms);
    shard.local.borrow_mut().insert(local.clone());
    let (ack, registered) = oneshot::channel();
    shard.to_home(&user, HomeMsg::SessionUp { user: user.clone(), session: me, ack });

    let result: Result<Welcome, Reject> = async {
        let accepted =
            registered.await.map_err(|_| Reject::new(ErrorCode::Unavailable, "shutting down"))?;
        if !accepted {
            return Err(Reject::new(
                ErrorCode::LimitExceeded,
                format!(
                    "at most {} sessions per user",
                    shard.config.limits.max_connections_per_user
                ),
            ));
        }
        // Every conversation of the user (in a cluster with more nodes than replicas, also
        // those of partitions this node holds no copy of).
        let conversations = match gather(shard, user.clone(), UserRead::Memberships).await? {
            UserReadReply::Memberships(ids) => ids,
            _ => return Err(Reject::new(ErrorCode::Internal, "internal error")),
        };
        let conversations = conversations.into_iter().map(|c| Arc::from(c.as_str())).collect();
        subscribe(shard, &user, &[id], conversations)
            .await
            .map_err(|_| Reject::new(ErrorCode::Unavailable, "storage unavailable"))?;
        let limits = &shard.config.limits;
        let u = user.clone();
        let feed_position = read(session, move |r| Ok(r.feed_head(&u)?)).await?;
        let resumed = match resume {
            Some(position) => {
                let read = UserRead::Sync {
                    position,
                    limit: sync::clamp(0, limits.max_sync_limit),
                    continuation: Vec::new(),
                    budget: limits.max_frame_bytes.saturating_sub(2 * super::REPLY_OVERHEAD),
                };
                match gather(shard, user.clone(), read).await? {
                    UserReadReply::Sync(page) => Some(page),
                    _ => return Err(Reject::new(ErrorCode::Internal, "internal error")),
                }
            }
            None => None,
        };
        Ok(Welcome { token_expires_at_ms, ..welcome(session, &user, me, feed_position, resumed) })
    }
    .await;

    match result {
        Ok(w) => {
            session
                .out
                .release_after(&ServerFrame::reply(request_id, server_frame::Kind::Welcome(w)));
            tracing::debug!("authenticated");
            Some(local)
        }
        Err(r) => {
            close_session(shard, id);
            let (reason, retry) = if r.code == ErrorCode::LimitExceeded {
                (DisconnectReason::ConnectionLimit, 0)
            } else {
                (DisconnectReason::ServerError, 1_000)
            };
            // Drop deliveries held during the handshake: the client never got a Welcome.
            session.out.replace_and_close(&[
                crate::shard::error_frame(request_id, r.code, &r.message),
                ServerFrame::disconnect(reason, &r.message, retry),
            ]);
            None
        }
    }
}

fn welcome(
    session: &Session,
    user: &str,
    me: SessionRef,
    feed_position: u64,
    resumed: Option<SyncPage>,
) -> Welcome {
    let cfg = &session.shard.config;
    let l = &cfg.limits;
    let clamp = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let nonce: u32 = rand::random();
    Welcome {
        user_id: user.to_owned(),
        session_id: format!("{}-{}-{nonce:08x}", me.shard, me.id),
        server_time_ms: now_ms(),
        heartbeat_interval_ms: u32::try_from(cfg.server.heartbeat_interval_ms).unwrap_or(u32::MAX),
        idle_timeout_ms: u32::try_from(cfg.server.idle_timeout_ms).unwrap_or(u32::MAX),
        limits: Some(Limits {
            max_frame_bytes: clamp(l.max_frame_bytes),
            max_body_bytes: clamp(l.max_body_bytes),
            max_history_limit: l.max_history_limit,
            max_sync_limit: l.max_sync_limit,
            max_inflight: clamp(l.max_inflight),
            max_group_members: clamp(l.max_group_members),
            max_members_per_request: clamp(l.max_members_per_request),
            max_id_bytes: clamp(validate::MAX_USER_ID_BYTES),
            max_conversation_id_bytes: clamp(validate::MAX_CONVERSATION_ID_BYTES),
            max_presence_users: clamp(l.max_presence_users),
            max_presence_subscriptions: clamp(l.max_presence_subscriptions),
            send_rate_per_sec: l.send_rate_per_sec,
            send_burst: l.send_burst,
        }),
        capabilities: CAPABILITIES.iter().map(ToString::to_string).collect(),
        feed_position,
        resumed,
        protocol_version: PROTOCOL_VERSION,
        token_expires_at_ms: 0,
    }
}
