//! Authentication end to end: every kind of bad token is refused with a typed error (code and
//! `reason`) and a clean close without disturbing other sessions; named keys (`kid`) for key
//! rotation; a session ends with `TOKEN_EXPIRED` when its token runs out unless `RefreshToken`
//! moved its deadline.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use switchboard_client::{Client, Content, EventStream};
use switchboard_protocol::{
    ClientFrame, DisconnectReason, ErrorCode, RefreshToken, ServerFrame, client_frame, server_frame,
};
use switchboard_tests::{Broker, Options, RawConn, SECRET, hello, http_get, messages};

const AUDIENCE: &str = "chat";
const ISSUER: &str = "https://auth.test";
/// The HS256 secret of the named key `k2` on the RS256 broker.
const K2_SECRET: &str = "the-secret-of-key-k2-0123456789";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../broker/tests/fixtures").join(name)
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis(),
    )
    .unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa.key.pem")).unwrap()).unwrap()
}

fn sign(
    alg: Algorithm,
    kid: Option<&str>,
    key: &EncodingKey,
    claims: &serde_json::Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

/// RS256 claims the RS256 broker accepts.
fn good_claims(user: &str) -> serde_json::Value {
    json!({"sub": user, "exp": now() + 3600, "aud": AUDIENCE, "iss": ISSUER})
}

fn rs256(claims: &serde_json::Value) -> String {
    sign(Algorithm::RS256, None, &rsa_key(), claims)
}

/// HS256 with the test secret (the default broker's key).
fn hs256(claims: &serde_json::Value) -> String {
    sign(Algorithm::HS256, None, &EncodingKey::from_secret(SECRET.as_bytes()), claims)
}

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A token with `alg` as given (unsigned).
fn unsigned(alg: &str, claims: &serde_json::Value) -> String {
    format!("{}.{}.", b64(&json!({"alg": alg, "typ": "JWT"})), b64(claims))
}

/// A broker that takes RS256 tokens (the fixture key) with an audience and issuer, plus the
/// named keys `k2` (HS256) and `k3` (RS256, the same key pair).
fn rs256_broker() -> Broker {
    Broker::start_with(Options { jwt_secret: false, args: rs256_args(), ..Options::default() })
}

/// The configuration of [`rs256_broker`], as flags.
fn rs256_args() -> Vec<String> {
    let public = fixture("rsa.pub.pem");
    let public = public.display();
    vec![
        "--set".into(),
        "auth.algorithm=\"RS256\"".into(),
        "--set".into(),
        format!("auth.public_key_file=\"{public}\""),
        "--set".into(),
        format!("auth.audience=\"{AUDIENCE}\""),
        "--set".into(),
        format!("auth.issuer=\"{ISSUER}\""),
        "--set".into(),
        format!(
            "auth.keys=[{{kid = \"k2\", secret = \"{K2_SECRET}\"}}, \
                 {{kid = \"k3\", algorithm = \"RS256\", public_key_file = \"{public}\"}}]"
        ),
    ]
}

/// Runs `switchboard token --user <user>` with `args`: the token, or the error it printed.
fn token_command(user: &str, args: &[String]) -> Result<String, String> {
    let out = std::process::Command::new(switchboard_tests::broker_bin())
        .args(["token", "--user", user])
        .args(args)
        .output()
        .expect("run switchboard token");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    if out.status.success() { Ok(text(&out.stdout)) } else { Err(text(&out.stderr)) }
}

#[tokio::test]
async fn given_a_named_hs256_key_when_the_token_command_names_its_kid_should_mint_accepted_tokens()
{
    let broker = rs256_broker();
    let mut args = rs256_args();
    args.extend(["--kid".into(), "k2".into()]);
    let token = token_command("mallory", &args).expect("minted");
    // Signed with k2's secret, its kid in the header, the configured aud and iss in the claims.
    let mut c = broker.raw().await;
    assert_eq!(c.hello(&token).await.user_id, "mallory");

    // Only HS256 keys can sign here: not the RS256 named key, not the RS256 unnamed key.
    let mut rs = rs256_args();
    rs.extend(["--kid".into(), "k3".into()]);
    let refused = token_command("mallory", &rs).expect_err("an RS256 key cannot mint");
    assert!(refused.contains("not HS256"), "{refused}");
    let refused = token_command("mallory", &rs256_args()).expect_err("unnamed RS256 key");
    assert!(refused.contains("not HS256"), "{refused}");
    let mut unknown = rs256_args();
    unknown.extend(["--kid".into(), "k9".into()]);
    let refused = token_command("mallory", &unknown).expect_err("unknown kid");
    assert!(refused.contains("k9"), "{refused}");
}

/// A broker on the test secret that closes sessions exactly at `exp` (leeway 0).
fn no_leeway_broker() -> Broker {
    Broker::start_with(Options::with_args(&["--set", "auth.leeway_secs=0"]))
}

/// The `Error` of the first frame and the reason of the closing `Disconnect`.
fn refusal(frames: &[ServerFrame]) -> (switchboard_protocol::Error, i32) {
    let error = match frames.first().and_then(|f| f.kind.clone()) {
        Some(server_frame::Kind::Error(e)) => e,
        other => panic!("expected an Error first, got {other:?} in {frames:?}"),
    };
    let reason = match frames.last().and_then(|f| f.kind.as_ref()) {
        Some(server_frame::Kind::Disconnect(d)) => d.reason,
        other => panic!("expected a Disconnect last, got {other:?}"),
    };
    (error, reason)
}

async fn hello_refused(broker: &Broker, token: &str) -> (switchboard_protocol::Error, i32) {
    let mut c = broker.raw().await;
    c.send(ClientFrame::request(1, hello(token))).await;
    refusal(&c.until_closed().await)
}

/// Two users chatting throughout, to show bad tokens disturb nobody else.
struct Bystanders {
    alice: Client,
    _bob: Client,
    bob_events: EventStream,
    conv: String,
}

impl Bystanders {
    async fn new(broker: &Broker, token: impl Fn(&str) -> String) -> Self {
        let connect =
            |user: &str| Client::builder(broker.addr.to_string()).token(token(user)).connect();
        let (alice, _) = connect("alice").await.expect("alice connects");
        let (bob, mut bob_events) = connect("bob").await.expect("bob connects");
        let conv = alice.create_direct("bob").await.expect("create").conversation_id;
        messages(&mut bob_events, &conv, 1).await;
        Self { alice, _bob: bob, bob_events, conv }
    }

    async fn still_chatting(&mut self) {
        let ack = self.alice.send(&self.conv, Content::text("still here")).await.expect("send");
        let m = messages(&mut self.bob_events, &self.conv, 1).await;
        assert_eq!(m[0].seq, ack.seq);
    }
}

#[tokio::test]
async fn given_bad_tokens_should_refuse_each_with_a_typed_reason_and_disturb_nobody() {
    let broker = rs256_broker();
    let mut ok = Bystanders::new(&broker, |u| rs256(&good_claims(u))).await;
    let public = std::fs::read(fixture("rsa.pub.pem")).unwrap();
    let k2 = EncodingKey::from_secret(K2_SECRET.as_bytes());
    let with = |patch: serde_json::Value| {
        let mut c = good_claims("eve");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    // A valid token's signature on other claims.
    let tampered = {
        let valid = rs256(&good_claims("eve"));
        let sig = valid.rsplit('.').next().unwrap().to_owned();
        let header = valid.split('.').next().unwrap().to_owned();
        format!("{header}.{}.{sig}", b64(&good_claims("mallory")))
    };
    let mut cases: Vec<(String, String, ErrorCode, &str)> = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let t = unsigned(alg, &good_claims("eve"));
        cases.push((format!("alg {alg}"), t, ErrorCode::Unauthenticated, "bad_algorithm"));
    }
    let u = ErrorCode::Unauthenticated;
    cases.extend([
        (
            "HS256 keyed with the RSA public key".to_owned(),
            sign(Algorithm::HS256, None, &EncodingKey::from_secret(&public), &good_claims("eve")),
            u,
            "bad_algorithm",
        ),
        (
            "expired beyond leeway".into(),
            rs256(&with(json!({"exp": now() - 3600}))),
            ErrorCode::TokenExpired,
            "expired",
        ),
        ("missing exp".into(), rs256(&with(json!({"exp": null}))), u, "missing_claim"),
        (
            "exp as a string".into(),
            rs256(&with(json!({"exp": (now() + 3600).to_string()}))),
            u,
            "invalid_claim",
        ),
        ("nbf as a string".into(), rs256(&with(json!({"nbf": "0"}))), u, "invalid_claim"),
        (
            "nbf in the future".into(),
            rs256(&with(json!({"nbf": now() + 3600}))),
            u,
            "not_yet_valid",
        ),
        ("wrong aud".into(), rs256(&with(json!({"aud": "other-app"}))), u, "bad_audience"),
        ("missing aud".into(), rs256(&with(json!({"aud": null}))), u, "missing_claim"),
        ("wrong iss".into(), rs256(&with(json!({"iss": "https://evil.test"}))), u, "bad_issuer"),
        ("bad signature".into(), tampered, u, "bad_signature"),
        (
            "unknown kid".into(),
            sign(Algorithm::RS256, Some("k9"), &rsa_key(), &good_claims("eve")),
            u,
            "unknown_kid",
        ),
        (
            "named key with the wrong secret".into(),
            sign(
                Algorithm::HS256,
                Some("k2"),
                &EncodingKey::from_secret(b"not-the-secret-of-k2-at-all"),
                &good_claims("eve"),
            ),
            u,
            "bad_signature",
        ),
        (
            "named HS256 key presented as RS256".into(),
            sign(Algorithm::RS256, Some("k2"), &rsa_key(), &good_claims("eve")),
            u,
            "bad_algorithm",
        ),
        ("bad subject".into(), rs256(&with(json!({"sub": "eve:admin"}))), u, "bad_subject"),
        ("not a token".into(), "not a token".into(), u, "malformed"),
    ]);
    // Named keys verify their own tokens (key rotation), and the unnamed key tokens without kid.
    for token in [
        rs256(&good_claims("eve")),
        sign(Algorithm::HS256, Some("k2"), &k2, &good_claims("eve")),
        sign(Algorithm::RS256, Some("k3"), &rsa_key(), &good_claims("eve")),
    ] {
        let mut c = broker.raw().await;
        assert_eq!(c.hello(&token).await.user_id, "eve");
    }
    for (name, token, code, reason) in &cases {
        let (error, disconnect) = hello_refused(&broker, token).await;
        assert_eq!(
            (ErrorCode::try_from(error.code), error.reason.as_str()),
            (Ok(*code), *reason),
            "{name}: {error:?}"
        );
        assert_eq!(disconnect, DisconnectReason::AuthFailed as i32, "{name}");
    }
    ok.still_chatting().await;
    let (_, metrics) = http_get(broker.http, "/metrics").await;
    for reason in ["bad_algorithm", "expired", "invalid_claim", "unknown_kid", "bad_signature"] {
        let line = format!("switchboard_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}

/// A token for `user` (test secret) whose `exp` is `secs` from now.
fn expiring(user: &str, secs: u64) -> (String, u64) {
    let exp = now() + secs;
    (hs256(&json!({"sub": user, "exp": exp})), exp)
}

async fn refresh(c: &mut RawConn, token: &str) -> server_frame::Kind {
    c.request(client_frame::Kind::RefreshToken(RefreshToken { token: token.into() })).await
}

fn disconnect_reason(frames: &[ServerFrame]) -> Option<i32> {
    match frames.last().and_then(|f| f.kind.as_ref()) {
        Some(server_frame::Kind::Disconnect(d)) => Some(d.reason),
        _ => None,
    }
}

#[tokio::test]
async fn given_token_expiring_when_not_refreshed_should_disconnect_with_token_expired_at_exp() {
    let broker = no_leeway_broker();
    let mut ok = Bystanders::new(&broker, |u| broker.token(u)).await;
    let (token, exp) = expiring("carol", 6);
    // One session idle, one busy pinging: both end at exp.
    let mut idle = broker.raw().await;
    let welcome = idle.hello(&token).await;
    assert_eq!(welcome.token_expires_at_ms, exp * 1000);
    let mut busy = broker.raw().await;
    busy.hello(&token).await;
    let pinging = async {
        loop {
            let id = busy.next_id();
            if !busy
                .try_send(ClientFrame::request(id, client_frame::Kind::Ping(Default::default())))
                .await
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if now_ms() > (exp + 10) * 1000 {
                break;
            }
        }
    };
    let (idle_frames, ()) = tokio::join!(idle.until_closed(), pinging);
    let closed_at = now_ms();
    assert_eq!(disconnect_reason(&idle_frames), Some(DisconnectReason::TokenExpired as i32));
    // Not before exp (a little clock slack), and promptly after it.
    assert!(closed_at + 200 >= exp * 1000, "closed {} ms before exp", exp * 1000 - closed_at);
    assert!(closed_at < (exp + 10) * 1000, "closed {} ms after exp", closed_at - exp * 1000);
    let busy_frames = busy.until_closed().await;
    assert_eq!(disconnect_reason(&busy_frames), Some(DisconnectReason::TokenExpired as i32));
    // No ping that arrived after exp was answered (the broker's wall clock, some slack).
    let late: Vec<u64> = busy_frames
        .iter()
        .filter_map(|f| match &f.kind {
            Some(server_frame::Kind::Pong(p)) => Some(p.server_time_ms),
            _ => None,
        })
        .filter(|at| *at > exp * 1000 + 50)
        .collect();
    assert!(late.is_empty(), "pings answered after exp: {late:?}");
    ok.still_chatting().await;
}

#[tokio::test]
async fn given_refresh_before_expiry_should_stay_open_past_the_original_exp_and_still_send() {
    let broker = no_leeway_broker();
    let (token, exp) = expiring("dave", 6);
    let mut c = broker.raw().await;
    c.hello(&token).await;
    let conv = c.create_direct("erin").await;
    let (fresh, fresh_exp) = expiring("dave", 3600);
    match refresh(&mut c, &fresh).await {
        server_frame::Kind::RefreshTokenOk(ok) => assert_eq!(ok.expires_at_ms, fresh_exp * 1000),
        other => panic!("expected RefreshTokenOk, got {other:?}"),
    }
    // Well past the old exp, with pings so the idle timeout is not what is tested.
    while now_ms() < (exp + 2) * 1000 {
        assert!(matches!(
            c.request(client_frame::Kind::Ping(Default::default())).await,
            server_frame::Kind::Pong(_)
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let send = client_frame::Kind::Send(switchboard_protocol::Send {
        conversation_id: conv,
        client_msg_id: "after-refresh".into(),
        content: Some(Content::text("still here")),
    });
    assert!(matches!(c.request(send).await, server_frame::Kind::SendAck(_)));
}

#[tokio::test]
async fn given_refresh_with_another_users_token_should_refuse_and_expire_on_the_old_deadline() {
    let broker = no_leeway_broker();
    let (token, exp) = expiring("frank", 6);
    let mut c = broker.raw().await;
    c.hello(&token).await;
    let (grace, _) = expiring("grace", 3600);
    match refresh(&mut c, &grace).await {
        server_frame::Kind::Error(e) => {
            assert_eq!(
                (e.code, e.reason.as_str()),
                (ErrorCode::Forbidden as i32, "subject_mismatch")
            );
        }
        other => panic!("expected an Error, got {other:?}"),
    }
    let frames = c.until_closed().await;
    let closed_at = now_ms();
    assert_eq!(disconnect_reason(&frames), Some(DisconnectReason::TokenExpired as i32));
    assert!(closed_at + 200 >= exp * 1000 && closed_at < (exp + 10) * 1000);
}

#[tokio::test]
async fn given_expired_or_bad_token_in_refresh_should_refuse_typed_and_keep_the_session() {
    let broker = Broker::start();
    let (mut c, welcome) = broker.raw_as("heidi").await;
    let expired = hs256(&json!({"sub": "heidi", "exp": now() - 3600}));
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"not-the-test-secret-0123"),
        &json!({"sub": "heidi", "exp": now() + 3600}),
    );
    for (token, code, reason) in [
        (expired, ErrorCode::TokenExpired, "expired"),
        (forged, ErrorCode::Unauthenticated, "bad_signature"),
        (
            unsigned("none", &json!({"sub": "heidi", "exp": now() + 3600})),
            ErrorCode::Unauthenticated,
            "bad_algorithm",
        ),
    ] {
        match refresh(&mut c, &token).await {
            server_frame::Kind::Error(e) => {
                assert_eq!((e.code, e.reason.as_str()), (code as i32, reason), "{e:?}");
            }
            other => panic!("expected an Error, got {other:?}"),
        }
    }
    // The session goes on with its old token.
    assert!(matches!(
        c.request(client_frame::Kind::Ping(Default::default())).await,
        server_frame::Kind::Pong(_)
    ));
    assert!(welcome.token_expires_at_ms > now_ms());
}

#[tokio::test]
async fn given_rust_client_when_refreshing_should_return_the_new_expiry_and_surface_token_expired()
{
    let broker = no_leeway_broker();
    let connect = |token: String| {
        Client::builder(broker.addr.to_string())
            .token(token)
            .reconnect(switchboard_client::ReconnectPolicy {
                base: Duration::from_millis(20),
                cap: Duration::from_millis(300),
                ..switchboard_client::ReconnectPolicy::default()
            })
            .connect()
    };
    // A refresh that is accepted returns the new token's exp.
    let (refreshed, _) = connect(expiring("ivan", 6).0).await.expect("connects");
    let (fresh, fresh_exp) = expiring("ivan", 3600);
    assert_eq!(refreshed.refresh_token(fresh).await.expect("refresh"), fresh_exp * 1000);
    let (client, mut events) = connect(expiring("ivan", 6).0).await.expect("connects");
    let (other, _) = expiring("judy", 3600);
    let err = client.refresh_token(other).await.unwrap_err();
    assert_eq!((err.code(), err.reason()), (Some(ErrorCode::Forbidden), Some("subject_mismatch")));
    // Not refreshed: the session ends with TOKEN_EXPIRED, and the expired static token is
    // then refused for good.
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
            Ok(Some(switchboard_client::Event::Disconnected { reason, .. })) => break reason,
            Ok(Some(_)) => {}
            other => panic!("no Disconnected event: {other:?}"),
        }
    };
    assert_eq!(reason, Some(DisconnectReason::TokenExpired));
}

#[tokio::test]
async fn given_refreshes_beyond_their_rate_should_refuse_with_retry_after_and_keep_the_session() {
    let broker = no_leeway_broker();
    let (token, _) = expiring("kim", 3600);
    let mut c = broker.raw().await;
    c.hello(&token).await;
    let mut refused = None;
    for _ in 0..20 {
        let (fresh, _) = expiring("kim", 3600);
        match refresh(&mut c, &fresh).await {
            server_frame::Kind::RefreshTokenOk(_) => {}
            server_frame::Kind::Error(e) => {
                refused = Some(e);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let e = refused.expect("a refresh beyond the burst is refused");
    assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
    assert!(e.retry_after_ms > 0);
    let pong = c.request(client_frame::Kind::Ping(Default::default())).await;
    assert!(matches!(pong, server_frame::Kind::Pong(_)), "the session goes on");
}
