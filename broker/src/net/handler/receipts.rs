//! `MarkRead`, `MarkDelivered` and `GetReceipts`: decided by the conversation's owner, which
//! keeps every member's watermarks in memory.

use switchboard_protocol::{GetReceipts, MarkDelivered, MarkRead, validate};

use super::Ctx;
use crate::shard::{OwnerOp, rate_limited_frame};

/// Whether the user may update a receipt now; replies `RATE_LIMITED` if not.
fn allowed(ctx: &Ctx<'_>, request_id: u64) -> bool {
    match ctx.shard.limiters.receipts.check(&ctx.session.user) {
        Ok(()) => true,
        Err(wait) => {
            ctx.session.send(&rate_limited_frame(request_id, "receipt", wait));
            false
        }
    }
}

/// Handles `MarkRead`.
pub fn mark_read(ctx: &Ctx<'_>, request_id: u64, req: MarkRead) {
    if let Err(e) = validate::conversation_id(&req.conversation_id) {
        ctx.reject(request_id, e.into());
        return;
    }
    if allowed(ctx, request_id) {
        ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::MarkRead(req));
    }
}

/// Handles `MarkDelivered`.
pub fn mark_delivered(ctx: &Ctx<'_>, request_id: u64, req: MarkDelivered) {
    if let Err(e) = validate::conversation_id(&req.conversation_id) {
        ctx.reject(request_id, e.into());
        return;
    }
    if allowed(ctx, request_id) {
        ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::MarkDelivered(req));
    }
}

/// Handles `GetReceipts`.
pub fn get_receipts(ctx: &Ctx<'_>, request_id: u64, req: GetReceipts) {
    let valid = validate::conversation_id(&req.conversation_id)
        .and_then(|()| if req.after.is_empty() { Ok(()) } else { validate::user_id(&req.after) });
    match valid {
        Ok(()) => ctx.to_owner(&req.conversation_id.clone(), request_id, OwnerOp::GetReceipts(req)),
        Err(e) => ctx.reject(request_id, e.into()),
    }
}
