//! `Send`: validated here, sequenced and acknowledged by the conversation's owner.

use switchboard_protocol::{ErrorCode, validate};

use super::{Ctx, Reject};
use crate::shard::OwnerOp;

/// Handles `Send`.
pub fn handle(ctx: &Ctx<'_>, request_id: u64, req: switchboard_protocol::Send) {
    if let Err(r) = check(ctx, &req) {
        ctx.reject(request_id, r);
        return;
    }
    if let Err(wait) = ctx.shard.limiters.send.check(&ctx.session.user) {
        ctx.session.send(&crate::shard::rate_limited_frame(request_id, "send", wait));
        return;
    }
    let conversation = req.conversation_id.clone();
    ctx.to_owner(&conversation, request_id, OwnerOp::Send(req));
}

fn check(ctx: &Ctx<'_>, req: &switchboard_protocol::Send) -> Result<(), Reject> {
    ctx.writable()?;
    validate::conversation_id(&req.conversation_id)?;
    validate::client_msg_id(&req.client_msg_id)?;
    let Some(content) = &req.content else {
        return Err(Reject::new(ErrorCode::BadRequest, "content is required"));
    };
    validate::content(content, ctx.shard.config.limits.max_body_bytes)?;
    Ok(())
}
