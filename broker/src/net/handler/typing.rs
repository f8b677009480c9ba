//! `Typing`: rate-limited per user, then forwarded by the owner to the members online now.

use switchboard_protocol::{Typing, validate};

use super::Ctx;
use crate::shard::{OwnerOp, rate_limited_frame};

/// Handles `Typing`.
pub fn handle(ctx: &Ctx<'_>, request_id: u64, req: Typing) {
    if let Err(e) = validate::conversation_id(&req.conversation_id) {
        ctx.reject(request_id, e.into());
        return;
    }
    if let Err(wait) = ctx.shard.limiters.typing.check(&ctx.session.user) {
        ctx.session.send(&rate_limited_frame(request_id, "typing", wait));
        return;
    }
    ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::Typing(req));
}
