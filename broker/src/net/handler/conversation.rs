//! `CreateConversation`, `AddMembers`, `RemoveMembers`, `Leave`: validated here, decided and
//! recorded (as system entries of the conversation's log) by the owner.

use std::sync::Arc;

use switchboard_protocol::{
    AddMembers, ConversationKind, CreateConversation, ErrorCode, HistoryVisibility, Leave,
    RemoveMembers, validate,
};

use super::{Ctx, Reject};
use crate::shard::OwnerOp;

/// Handles `CreateConversation`. A user already in `limits.max_conversations_per_user`
/// conversations (in the durable view) cannot create another (asking again for one they are
/// already in is fine).
pub fn create(ctx: &Ctx<'_>, request_id: u64, mut req: CreateConversation) {
    let id = match resolve(ctx, &mut req) {
        Ok(id) => id,
        Err(r) => return ctx.reject(request_id, r),
    };
    ctx.session.request_started();
    let (shard, session, me) = (ctx.shard.clone(), ctx.session.clone(), ctx.me);
    let max = shard.config.limits.max_conversations_per_user;
    tokio::task::spawn_local(async move {
        let storage = shard.storage.clone();
        let (user, conv) = (session.user.clone(), id.clone());
        let full = tokio::task::spawn_blocking(move || -> Result<bool, Reject> {
            let r = storage.reader();
            Ok(r.member(&conv, &user)?.is_none() && r.count_memberships(&user, max)? >= max)
        })
        .await
        .unwrap_or_else(|_| Err(Reject::new(ErrorCode::Internal, "internal error")));
        let ctx = Ctx { shard: &shard, session: &session, me };
        match full {
            Ok(false) => ctx.to_owner(
                &id.clone(),
                request_id,
                OwnerOp::Create { conversation_id: id, request: req },
            ),
            Ok(true) => ctx.reject(
                request_id,
                Reject::new(
                    ErrorCode::LimitExceeded,
                    format!("a user belongs to at most {max} conversations"),
                ),
            ),
            Err(r) => ctx.reject(request_id, r),
        }
        session.request_done();
    });
}

/// Validates a create request and decides the conversation id.
fn resolve(ctx: &Ctx<'_>, req: &mut CreateConversation) -> Result<Arc<str>, Reject> {
    ctx.writable()?;
    let me = &*ctx.session.user;
    check_users(ctx, &req.members)?;
    let others: Vec<&String> = req.members.iter().filter(|m| m.as_str() != me).collect();
    match ConversationKind::try_from(req.kind) {
        Ok(ConversationKind::Direct) => {
            let Some(other) = others.first() else {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "a direct conversation needs one other user",
                ));
            };
            if others.iter().any(|o| o != other) {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "a direct conversation has exactly two users",
                ));
            }
            let id = validate::direct_conversation_id(me, other);
            req.members = vec![(*other).clone()];
            req.name.clear();
            req.visibility = HistoryVisibility::Shared as i32;
            Ok(Arc::from(id))
        }
        Ok(ConversationKind::Group) => {
            validate::name(&req.name)?;
            if HistoryVisibility::try_from(req.visibility).is_err() {
                return Err(Reject::new(ErrorCode::BadRequest, "unknown history visibility"));
            }
            if req.conversation_id.is_empty() {
                let bytes: [u8; 16] = rand::random();
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                return Ok(Arc::from(format!("g:{hex}")));
            }
            validate::conversation_id(&req.conversation_id)?;
            if req.conversation_id.starts_with(validate::DIRECT_PREFIX) {
                return Err(Reject::new(
                    ErrorCode::BadRequest,
                    "group ids must not start with \"dm:\"",
                ));
            }
            Ok(Arc::from(req.conversation_id.as_str()))
        }
        _ => Err(Reject::new(ErrorCode::BadRequest, "kind must be DIRECT or GROUP")),
    }
}

fn check_users(ctx: &Ctx<'_>, users: &[String]) -> Result<(), Reject> {
    let max = ctx.shard.config.limits.max_members_per_request;
    if users.len() > max {
        return Err(Reject::new(
            ErrorCode::LimitExceeded,
            format!("at most {max} users per request"),
        ));
    }
    for u in users {
        validate::user_id(u)?;
    }
    Ok(())
}

fn check_change(ctx: &Ctx<'_>, conversation: &str, users: &[String]) -> Result<(), Reject> {
    validate::conversation_id(conversation)?;
    if users.is_empty() {
        return Err(Reject::new(ErrorCode::BadRequest, "users must not be empty"));
    }
    check_users(ctx, users)
}

/// Handles `AddMembers`.
pub fn add_members(ctx: &Ctx<'_>, request_id: u64, req: AddMembers) {
    match ctx.writable().and_then(|()| check_change(ctx, &req.conversation_id, &req.users)) {
        Ok(()) => ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::AddMembers(req)),
        Err(r) => ctx.reject(request_id, r),
    }
}

/// Handles `RemoveMembers`.
pub fn remove_members(ctx: &Ctx<'_>, request_id: u64, req: RemoveMembers) {
    match check_change(ctx, &req.conversation_id, &req.users) {
        Ok(()) => {
            ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::RemoveMembers(req))
        }
        Err(r) => ctx.reject(request_id, r),
    }
}

/// Handles `Leave`.
pub fn leave(ctx: &Ctx<'_>, request_id: u64, req: Leave) {
    match validate::conversation_id(&req.conversation_id) {
        Ok(()) => ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::Leave(req)),
        Err(e) => ctx.reject(request_id, e.into()),
    }
}
