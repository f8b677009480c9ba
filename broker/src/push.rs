//! Push notifications for offline users: the webhook client.
//!
//! A notification is one HTTP `POST` of a JSON body to the configured URL:
//!
//! ```json
//! {"id":"bob/dm:alice:bob/4","user_id":"bob","conversation_id":"dm:alice:bob",
//!  "conversation_kind":"direct","conversation_name":"","count":3,"latest_sender":"alice",
//!  "first_seq":2,"last_seq":4,"text":"3 new messages from alice","window_start_ms":…,"sent_at_ms":…}
//! ```
//!
//! with the headers `Content-Type: application/json`, `X-Switchboard-Delivery: <id>` (the same
//! on retries, so receivers can deduplicate) and `X-Switchboard-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the exact body bytes under the configured secret. Any 2xx status is success;
//! anything else, or no answer within the timeout, is retried with exponential backoff.
//! Coalescing and persistence live with the user's home shard ([`crate::shard::home`]).

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::config::PushConfig;

/// Name of the signature header.
pub const SIGNATURE_HEADER: &str = "X-Switchboard-Signature";
/// Name of the delivery id header.
pub const DELIVERY_HEADER: &str = "X-Switchboard-Delivery";

/// The JSON body of one notification.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Notification {
    /// Stable across retries: `<user>/<conversation>/<last_seq>`.
    pub id: String,
    /// Who to notify.
    pub user_id: String,
    /// Where the messages are.
    pub conversation_id: String,
    /// `direct` or `group`.
    pub conversation_kind: &'static str,
    /// The group's name (empty for direct conversations).
    pub conversation_name: String,
    /// Messages in the window.
    pub count: u64,
    /// Sender of the newest one.
    pub latest_sender: String,
    /// Seq of the first and the newest message.
    pub first_seq: u64,
    /// Seq of the newest message.
    pub last_seq: u64,
    /// A ready-made line, e.g. "3 new messages from alice".
    pub text: String,
    /// When the first message arrived (ms since the epoch).
    pub window_start_ms: u64,
    /// When this attempt was made (ms since the epoch).
    pub sent_at_ms: u64,
}

/// The human line of a notification.
#[must_use]
pub fn summary(count: u64, sender: &str, conversation_name: &str) -> String {
    let what =
        if count == 1 { "1 new message".to_owned() } else { format!("{count} new messages") };
    if conversation_name.is_empty() {
        format!("{what} from {sender}")
    } else {
        format!("{what} in {conversation_name}, latest from {sender}")
    }
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The receiver answered with a non-2xx status.
    #[error("webhook answered {0}")]
    Status(u16),
    /// No answer (connect, TLS, timeout).
    #[error("webhook unreachable: {0}")]
    Transport(String),
}

/// The webhook client. Cheap to clone.
#[derive(Clone)]
pub struct Webhook {
    client: reqwest::Client,
    url: String,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).finish_non_exhaustive()
    }
}

/// `hex(hmac_sha256(secret, body))`.
#[must_use]
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

impl Webhook {
    /// The client for `[push]`, or `None` when no webhook is configured.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS setup).
    pub fn from_config(cfg: &PushConfig) -> Result<Option<Self>, String> {
        let (Some(url), Some(secret)) = (&cfg.webhook_url, &cfg.secret) else { return Ok(None) };
        // One process-wide TLS provider (ring); an error only means it is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .user_agent(concat!("switchboard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Some(Self { client, url: url.clone(), secret: secret.as_bytes().to_vec() }))
    }

    /// Posts one notification.
    ///
    /// # Errors
    /// A non-2xx status or a transport failure.
    pub async fn deliver(&self, n: &Notification) -> Result<(), PushError> {
        let body = serde_json::to_vec(n).map_err(|e| PushError::Transport(e.to_string()))?;
        let signature = format!("sha256={}", sign(&self.secret, &body));
        let response = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header(DELIVERY_HEADER, &n.id)
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await
            .map_err(|e| PushError::Transport(e.to_string()))?;
        let status = response.status();
        if status.is_success() { Ok(()) } else { Err(PushError::Status(status.as_u16())) }
    }
}

/// Delay before attempt `attempt` (1-based) is retried: 1 s, 2 s, 4 s, … capped at 60 s.
#[must_use]
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_known_key_and_body_should_match_the_hmac_sha256_test_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn given_counts_should_phrase_the_summary() {
        assert_eq!(summary(1, "alice", ""), "1 new message from alice");
        assert_eq!(summary(3, "alice", "team"), "3 new messages in team, latest from alice");
    }

    #[test]
    fn given_attempts_backoff_should_double_up_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
