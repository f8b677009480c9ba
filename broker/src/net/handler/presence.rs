//! `PresenceQuery`, `PresenceSubscribe`, `PresenceUnsubscribe`: answered by the users' home
//! shards (in a cluster, on the users' home nodes); users a home shard has no record of are
//! looked up in storage (last seen).

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use switchboard_protocol::{
    ErrorCode, Presence, PresenceList, PresenceQuery, PresenceSubscribe, PresenceUnsubscribe,
    server_frame, validate,
};
use tokio::sync::oneshot;

use super::{Ctx, Reject};
use crate::shard::{HomeMsg, SessionRef, Shard, group_by_home};

/// Validates and deduplicates a user list.
fn users(ctx: &Ctx<'_>, users: &[String]) -> Result<Vec<Arc<str>>, Reject> {
    let max = ctx.shard.config.limits.max_presence_users;
    if users.len() > max {
        return Err(Reject::new(
            ErrorCode::LimitExceeded,
            format!("at most {max} users per request"),
        ));
    }
    let mut out: Vec<Arc<str>> = Vec::with_capacity(users.len());
    for u in users {
        validate::user_id(u)?;
        if !out.iter().any(|o| **o == **u) {
            out.push(Arc::from(u.as_str()));
        }
    }
    Ok(out)
}

type Ask = fn(Vec<Arc<str>>, oneshot::Sender<Vec<Option<Presence>>>, SessionRef) -> HomeMsg;

/// Asks each home shard about its users (and registers subscriptions), and replies in the
/// request's order. In a cluster only a user's home node knows its presence: users homed on
/// another node are asked there (`cluster::presence`), and a node that does not answer leaves
/// them to the local store. Users nobody has a record of are looked up in storage.
fn answer(ctx: &Ctx<'_>, request_id: u64, users: Vec<Arc<str>>, ask: Ask) {
    ctx.session.request_started();
    let shard: Rc<Shard> = ctx.shard.clone();
    let session = ctx.session.clone();
    let me = ctx.me;
    tokio::task::spawn_local(async move {
        let mut waits = Vec::new();
        for (home, group) in group_by_home(users.iter().cloned(), shard.count) {
            let (tx, rx) = oneshot::channel();
            shard.send_home_at(home, ask(group.clone(), tx, me));
            waits.push(async move { (group, rx.await.unwrap_or_default()) });
        }
        let mut known: HashMap<Arc<str>, Presence> = HashMap::new();
        for (group, answers) in futures::future::join_all(waits).await {
            for (user, p) in group.into_iter().zip(answers) {
                if let Some(p) = p {
                    known.insert(user, p);
                }
            }
        }
        let live = shard.home.borrow().live().cloned();
        if let Some(live) = live {
            let mut remote: HashMap<crate::cluster::NodeId, Vec<Arc<str>>> = HashMap::new();
            for u in &users {
                let home = live.home(u);
                if home != live.me {
                    known.remove(u);
                    remote.entry(home).or_default().push(u.clone());
                }
            }
            let asks = remote.into_iter().map(|(node, group)| shard.query_node(node, group));
            for answer in futures::future::join_all(asks).await.into_iter().flatten() {
                for p in answer {
                    known.insert(Arc::from(p.user_id.as_str()), p);
                }
            }
        }
        let missing: Vec<Arc<str>> =
            users.iter().filter(|u| !known.contains_key(*u)).cloned().collect();
        for p in crate::shard::home::stored_presence(shard.storage.clone(), missing).await {
            known.insert(Arc::from(p.user_id.as_str()), p);
        }
        let presences = users
            .iter()
            .map(|u| {
                known
                    .remove(u)
                    .unwrap_or_else(|| Presence { user_id: u.to_string(), ..Presence::default() })
            })
            .collect();
        session.send(&switchboard_protocol::ServerFrame::reply(
            request_id,
            server_frame::Kind::Presences(PresenceList { presences }),
        ));
        session.request_done();
    });
}

/// Handles `PresenceQuery`.
pub fn query(ctx: &Ctx<'_>, request_id: u64, req: PresenceQuery) {
    match users(ctx, &req.users) {
        Ok(users) => answer(ctx, request_id, users, |users, reply, _| HomeMsg::PresenceQuery {
            users,
            reply,
        }),
        Err(r) => ctx.reject(request_id, r),
    }
}

/// Handles `PresenceSubscribe`.
pub fn subscribe(ctx: &Ctx<'_>, request_id: u64, req: PresenceSubscribe) {
    let users = match users(ctx, &req.users) {
        Ok(u) => u,
        Err(r) => return ctx.reject(request_id, r),
    };
    {
        let mut subs = ctx.session.presence_subs.borrow_mut();
        let max = ctx.shard.config.limits.max_presence_subscriptions;
        let new = users.iter().filter(|u| !subs.contains(*u)).count();
        if subs.len() + new > max {
            drop(subs);
            return ctx.reject(
                request_id,
                Reject::new(
                    ErrorCode::LimitExceeded,
                    format!("at most {max} presence subscriptions per session"),
                ),
            );
        }
        subs.extend(users.iter().cloned());
    }
    answer(ctx, request_id, users, |users, reply, session| HomeMsg::PresenceSubscribe {
        session,
        users,
        reply,
    });
}

/// Handles `PresenceUnsubscribe`.
pub fn unsubscribe(ctx: &Ctx<'_>, request_id: u64, req: PresenceUnsubscribe) {
    let users = match users(ctx, &req.users) {
        Ok(u) => u,
        Err(r) => return ctx.reject(request_id, r),
    };
    {
        let mut subs = ctx.session.presence_subs.borrow_mut();
        for u in &users {
            subs.remove(u);
        }
    }
    for (home, users) in group_by_home(users, ctx.shard.count) {
        ctx.shard.send_home_at(home, HomeMsg::PresenceUnsubscribe { session: ctx.me, users });
    }
    ctx.reply(request_id, server_frame::Kind::Ack(switchboard_protocol::Ack {}));
}
