//! `RefreshToken`: replace the session's token before it expires.
//!
//! The new token is verified like Hello's and must name the session's user. On success the
//! session's deadline (read by the transport's reader, see `net::session`) moves to the new
//! token's `exp` plus leeway; on failure the session keeps its old token and deadline.

use switchboard_protocol::{RefreshToken, RefreshTokenOk, server_frame};

use super::Ctx;
use crate::auth::{AuthError, session_deadline_ms};

/// Handles `RefreshToken`.
pub fn handle(ctx: &Ctx<'_>, request_id: u64, req: &RefreshToken) {
    // Each refresh costs a signature check on this shard's thread: a few per minute is all a
    // client needs.
    if let Err(wait) = ctx.shard.limiters.refresh.check(&ctx.session.user) {
        ctx.session.send(&crate::shard::rate_limited_frame(request_id, "refresh", wait));
        return;
    }
    let auth = &ctx.shard.auth;
    let verified = auth.verify(&req.token).and_then(|v| {
        if *v.user == *ctx.session.user {
            Ok(v)
        } else {
            let e = AuthError::SubjectMismatch;
            e.count();
            Err(e)
        }
    });
    match verified {
        Ok(v) => {
            ctx.session.set_token_deadline(session_deadline_ms(v.expires_at, auth.leeway_secs()));
            tracing::debug!(exp = v.expires_at, "token refreshed");
            ctx.reply(
                request_id,
                server_frame::Kind::RefreshTokenOk(RefreshTokenOk {
                    expires_at_ms: v.expires_at.saturating_mul(1000),
                }),
            );
        }
        Err(e) => {
            tracing::info!(reason = %e, "token refresh refused");
            ctx.session.send(&e.to_frame(request_id));
        }
    }
}
