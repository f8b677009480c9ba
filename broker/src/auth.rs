//! JWT verification and development token minting.
//!
//! The header is read first: its `kid` picks the key (a named `[[auth.keys]]` entry; no `kid`:
//! the unnamed key), and its `alg` must be exactly that key's algorithm, so `alg: none` in any
//! letter case and algorithm confusion (an HS256 token keyed with an RSA public key) are
//! refused before any signature check. jsonwebtoken then verifies the signature only; the
//! claims are checked here, with their JSON types: `exp` (required) and `nbf` (optional) are
//! numbers, tolerating `leeway_secs` of skew; `sub` (required) is a string and a valid user id;
//! `aud` and `iss`, when configured, are required and must match.
//!
//! Every rejection has a stable machine-readable [`AuthError::reason`], sent to the client in
//! `Error.reason` and counted in `switchboard_auth_failures_total{reason}`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::Value;
use switchboard_protocol::{ErrorCode, ServerFrame, server_frame};

use crate::config::{AuthConfig, JwtAlgorithm, KeyConfig};

/// Name of the generated secret in the data directory.
pub const SECRET_FILE: &str = "jwt.secret";

/// Why a token was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token is past `exp` plus leeway.
    #[error("token expired")]
    Expired,
    /// The token is before `nbf` minus leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// The signature does not verify with the key.
    #[error("invalid token signature")]
    BadSignature,
    /// The header's `alg` is not the key's algorithm (including `none`).
    #[error("token algorithm {0:?} is not accepted")]
    BadAlgorithm(String),
    /// The header's `kid` names no configured key (empty: the token has no `kid` and only
    /// named keys are configured).
    #[error("{}", if .0.is_empty() { "token has no key id (kid) and no unnamed key is configured".to_owned() } else { format!("unknown key id (kid) {:?}", .0) })]
    UnknownKid(String),
    /// A required claim is missing.
    #[error("token is missing the `{0}` claim")]
    MissingClaim(String),
    /// A claim has the wrong JSON type or an impossible value.
    #[error("token claim `{0}` has an invalid type or value")]
    InvalidClaim(String),
    /// `aud` does not match the configured audience.
    #[error("token audience is not accepted")]
    BadAudience,
    /// `iss` does not match the configured issuer.
    #[error("token issuer is not accepted")]
    BadIssuer,
    /// `sub` is not a valid user id.
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(String),
    /// Anything else: not a JWT, bad base64 or JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A refreshed token names another user than the session's.
    #[error("the new token is for another user")]
    SubjectMismatch,
}

impl AuthError {
    /// The stable machine-readable reason (`Error.reason` on the wire, the metric's label).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSignature => "bad_signature",
            Self::BadAlgorithm(_) => "bad_algorithm",
            Self::UnknownKid(_) => "unknown_kid",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::BadAudience => "bad_audience",
            Self::BadIssuer => "bad_issuer",
            Self::BadSubject(_) => "bad_subject",
            Self::Malformed(_) => "malformed",
            Self::SubjectMismatch => "subject_mismatch",
        }
    }

    /// The error code sent for it: `TOKEN_EXPIRED`, `FORBIDDEN` (another user's token on
    /// refresh) or `UNAUTHENTICATED`.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TokenExpired,
            Self::SubjectMismatch => ErrorCode::Forbidden,
            _ => ErrorCode::Unauthenticated,
        }
    }

    /// Counts the failure in `switchboard_auth_failures_total{reason}`.
    pub fn count(&self) {
        metrics::counter!(crate::metrics::AUTH_FAILURES, "reason" => self.reason()).increment(1);
    }

    /// The `Error` reply for it, with `code` and `reason` set.
    #[must_use]
    pub fn to_frame(&self, request_id: u64) -> ServerFrame {
        let mut frame = ServerFrame::error(request_id, self.code(), self.to_string());
        if let Some(server_frame::Kind::Error(e)) = frame.kind.as_mut() {
            self.reason().clone_into(&mut e.reason);
        }
        frame
    }
}

/// A key setup error at start-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key material is invalid.
    #[error("invalid key in {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The configuration has no key for what was asked.
    #[error("{0}")]
    NoKey(String),
}

/// An accepted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `sub`: the user id.
    pub user: String,
    /// `exp`, in seconds since the epoch.
    pub expires_at: u64,
}

/// One verification key.
#[derive(Clone)]
struct Key {
    algorithm: Algorithm,
    /// The `alg` header value tokens for it must carry (exact spelling).
    alg_name: &'static str,
    key: DecodingKey,
    /// Signature-only validation: claims are checked by [`Authenticator::check_claims`].
    validation: Validation,
}

/// Verifies tokens; cheap to share across shards.
#[derive(Clone)]
pub struct Authenticator {
    unnamed: Option<Key>,
    named: HashMap<String, Key>,
    leeway: u64,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("unnamed", &self.unnamed.as_ref().map(|k| k.algorithm))
            .field("named", &self.named.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn algorithm(a: JwtAlgorithm) -> (Algorithm, &'static str) {
    match a {
        JwtAlgorithm::Hs256 => (Algorithm::HS256, "HS256"),
        JwtAlgorithm::Rs256 => (Algorithm::RS256, "RS256"),
        JwtAlgorithm::EdDsa => (Algorithm::EdDSA, "EdDSA"),
    }
}

/// Reads a PEM public key for `alg`.
fn public_key(alg: JwtAlgorithm, path: &Path) -> Result<DecodingKey, KeyError> {
    let pem = std::fs::read(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    let key = if alg == JwtAlgorithm::Rs256 {
        DecodingKey::from_rsa_pem(&pem)
    } else {
        DecodingKey::from_ed_pem(&pem)
    };
    key.map_err(|e| KeyError::Invalid { path: path.into(), message: e.to_string() })
}

fn key(alg: JwtAlgorithm, key: DecodingKey) -> Key {
    let (algorithm, alg_name) = algorithm(alg);
    let mut validation = Validation::new(algorithm);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    Key { algorithm, alg_name, key, validation }
}

fn named_key(k: &KeyConfig) -> Result<Key, KeyError> {
    let decoding = match k.algorithm {
        JwtAlgorithm::Hs256 => DecodingKey::from_secret(&named_secret(k)?),
        JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
            let path = k.public_key_file.clone().unwrap_or_default();
            public_key(k.algorithm, &path)?
        }
    };
    Ok(key(k.algorithm, decoding))
}

/// The HS256 secret of a named key: configured inline or in its file.
fn named_secret(k: &KeyConfig) -> Result<Vec<u8>, KeyError> {
    match (&k.secret, &k.secret_file) {
        (Some(s), _) => Ok(s.as_bytes().to_vec()),
        (None, Some(path)) => read_secret(path),
        (None, None) => Err(KeyError::NoKey(format!("key {:?} has no secret", k.kid))),
    }
}

/// A claim; `null` counts as absent.
fn claim<'a>(claims: &'a serde_json::Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).filter(|v| !v.is_null())
}

/// A NumericDate claim: a non-negative JSON number (fractions are truncated).
fn numeric_date(
    claims: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<u64>, AuthError> {
    let Some(v) = claim(claims, name) else { return Ok(None) };
    let invalid = || AuthError::InvalidClaim(name.to_owned());
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match v.as_f64() {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(f) if (0.0..1.8e19).contains(&f) => Ok(Some(f as u64)),
        _ => Err(invalid()),
    }
}

impl Authenticator {
    /// Builds the verifier from the configuration, reading or generating key material.
    ///
    /// # Errors
    /// When a key file cannot be read or is invalid.
    pub fn from_config(cfg: &AuthConfig, data_dir: &Path) -> Result<Self, KeyError> {
        let unnamed = if cfg.unnamed_key_in_use() {
            let decoding = match cfg.algorithm {
                JwtAlgorithm::Hs256 => DecodingKey::from_secret(&hs256_secret(cfg, data_dir)?),
                JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                    public_key(cfg.algorithm, &cfg.public_key_file.clone().unwrap_or_default())?
                }
            };
            Some(key(cfg.algorithm, decoding))
        } else {
            None
        };
        let mut named = HashMap::new();
        for k in &cfg.keys {
            if named.insert(k.kid.clone(), named_key(k)?).is_some() {
                return Err(KeyError::Invalid {
                    path: PathBuf::new(),
                    message: format!("key id {:?} is configured twice", k.kid),
                });
            }
        }
        Ok(Self {
            unnamed,
            named,
            leeway: cfg.leeway_secs,
            audience: cfg.audience.clone(),
            issuer: cfg.issuer.clone(),
        })
    }

    /// The configured leeway on `exp` and `nbf`, in seconds.
    #[must_use]
    pub fn leeway_secs(&self) -> u64 {
        self.leeway
    }

    /// Verifies a token; failures are counted in the metrics.
    ///
    /// # Errors
    /// The reason the token is not accepted.
    pub fn verify(&self, token: &str) -> Result<Verified, AuthError> {
        let result = self.check(token);
        if let Err(e) = &result {
            e.count();
        }
        result
    }

    fn check(&self, token: &str) -> Result<Verified, AuthError> {
        let header = token.split('.').next().unwrap_or_default();
        let header: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| AuthError::Malformed("the header is not base64url JSON".into()))?;
        let Value::Object(header) = header else {
            return Err(AuthError::Malformed("the header is not a JSON object".into()));
        };
        let key = match header.get("kid") {
            None => self.unnamed.as_ref().ok_or_else(|| AuthError::UnknownKid(String::new()))?,
            // Identity providers put a `kid` in every token: with no named keys configured, the
            // one key verifies them all (the algorithm check below still applies).
            Some(Value::String(kid)) => match (self.named.get(kid), &self.unnamed) {
                (Some(key), _) => key,
                (None, Some(key)) if self.named.is_empty() => key,
                (None, _) => return Err(AuthError::UnknownKid(kid.clone())),
            },
            Some(_) => return Err(AuthError::Malformed("`kid` is not a string".into())),
        };
        match header.get("alg") {
            Some(Value::String(alg)) if alg == key.alg_name => {}
            Some(Value::String(alg)) => return Err(AuthError::BadAlgorithm(alg.clone())),
            Some(_) => return Err(AuthError::Malformed("`alg` is not a string".into())),
            None => return Err(AuthError::Malformed("the header has no `alg`".into())),
        }
        let data =
            jsonwebtoken::decode::<Value>(token, &key.key, &key.validation).map_err(|e| match e
                .kind()
            {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::BadAlgorithm(key.alg_name.to_owned())
                }
                _ => AuthError::Malformed(e.to_string()),
            })?;
        let Value::Object(claims) = data.claims else {
            return Err(AuthError::Malformed("the claims are not a JSON object".into()));
        };
        self.check_claims(&claims, jsonwebtoken::get_current_timestamp())
    }

    /// Checks the claims of a token whose signature verified, at time `now` (seconds).
    fn check_claims(
        &self,
        claims: &serde_json::Map<String, Value>,
        now: u64,
    ) -> Result<Verified, AuthError> {
        let exp =
            numeric_date(claims, "exp")?.ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        let nbf = numeric_date(claims, "nbf")?;
        numeric_date(claims, "iat")?;
        let sub = match claim(claims, "sub") {
            None => return Err(AuthError::MissingClaim("sub".into())),
            Some(Value::String(s)) => s,
            Some(_) => return Err(AuthError::InvalidClaim("sub".into())),
        };
        if exp.saturating_add(self.leeway) < now {
            return Err(AuthError::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(self.leeway)) {
            return Err(AuthError::NotYetValid);
        }
        if let Some(want) = &self.issuer {
            match claim(claims, "iss") {
                None => return Err(AuthError::MissingClaim("iss".into())),
                Some(Value::String(iss)) if iss == want => {}
                Some(Value::String(_)) => return Err(AuthError::BadIssuer),
                Some(_) => return Err(AuthError::InvalidClaim("iss".into())),
            }
        }
        if let Some(want) = &self.audience {
            let ok = match claim(claims, "aud") {
                None => return Err(AuthError::MissingClaim("aud".into())),
                Some(Value::String(aud)) => aud == want,
                Some(Value::Array(auds)) => {
                    if !auds.iter().all(Value::is_string) {
                        return Err(AuthError::InvalidClaim("aud".into()));
                    }
                    auds.iter().any(|a| a.as_str() == Some(want))
                }
                Some(_) => return Err(AuthError::InvalidClaim("aud".into())),
            };
            if !ok {
                return Err(AuthError::BadAudience);
            }
        }
        switchboard_protocol::validate::user_id(sub)
            .map_err(|e| AuthError::BadSubject(e.to_string()))?;
        Ok(Verified { user: sub.clone(), expires_at: exp })
    }
}

/// When a session authenticated with a token expiring at `expires_at` (seconds) must close:
/// `exp` plus `leeway`, in ms since the epoch.
#[must_use]
pub fn session_deadline_ms(expires_at: u64, leeway_secs: u64) -> u64 {
    expires_at.saturating_add(leeway_secs).saturating_mul(1000)
}

/// Time left before `deadline_ms` (ms since the epoch); zero once it passed.
#[must_use]
pub fn time_left(deadline_ms: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Duration::from_millis(deadline_ms.saturating_sub(now))
}

fn read_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Io { path: path.into(), source })?;
    let trimmed = bytes.trim_ascii().to_vec();
    if trimmed.len() < 16 {
        return Err(KeyError::Invalid {
            path: path.into(),
            message: "secret shorter than 16 bytes".into(),
        });
    }
    Ok(trimmed)
}

/// The HS256 secret: configured, from a file, or generated into the data directory.
///
/// # Errors
/// When the secret file cannot be read or created.
pub fn hs256_secret(cfg: &AuthConfig, data_dir: &Path) -> Result<Vec<u8>, KeyError> {
    if let Some(s) = &cfg.secret {
        return Ok(s.as_bytes().to_vec());
    }
    let path = cfg.secret_file.clone().unwrap_or_else(|| data_dir.join(SECRET_FILE));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let trimmed = bytes.trim_ascii().to_vec();
            if trimmed.len() < 16 {
                return Err(KeyError::Invalid {
                    path,
                    message: "secret shorter than 16 bytes".into(),
                });
            }
            Ok(trimmed)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && cfg.secret_file.is_none() => {
            generate_secret(&path)
        }
        Err(source) => Err(KeyError::Io { path, source }),
    }
}

fn generate_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let secret: String = {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    // create_new: if another process won the race, read its secret instead.
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(mut f) => {
            f.write_all(secret.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            tracing::info!(path = %path.display(), "generated a new token secret");
            Ok(secret.into_bytes())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok(std::fs::read(path).map_err(io)?.trim_ascii().to_vec())
        }
        Err(e) => Err(io(e)),
    }
}

/// Mints an HS256 token for `user`, valid for `ttl`, with no `kid`, `aud` or `iss`.
///
/// # Errors
/// When `user` is not a valid user id or signing fails.
pub fn mint(secret: &[u8], user: &str, ttl: Duration) -> Result<String, AuthError> {
    Minter { secret: secret.to_vec(), kid: None, audience: None, issuer: None }.mint(user, ttl)
}

/// Mints HS256 tokens this broker's configuration accepts (`switchboard token`, `/dev/token`):
/// signed with the unnamed secret or a named key's, carrying its `kid` and the configured
/// `aud` and `iss`.
#[derive(Clone)]
pub struct Minter {
    secret: Vec<u8>,
    kid: Option<String>,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Minter")
            .field("kid", &self.kid)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

impl Minter {
    /// The minter for the unnamed HS256 key (`kid: None`; generated into the data directory
    /// when none is configured) or the named key `kid`.
    ///
    /// # Errors
    /// When the key is not configured, is not HS256, or its secret cannot be read.
    pub fn from_config(
        cfg: &AuthConfig,
        data_dir: &Path,
        kid: Option<&str>,
    ) -> Result<Self, KeyError> {
        let invalid = KeyError::NoKey;
        let secret = match kid {
            None if !cfg.unnamed_key_in_use() => {
                return Err(invalid(
                    "only named keys ([[auth.keys]]) are configured: name one with --kid".into(),
                ));
            }
            None if cfg.algorithm != JwtAlgorithm::Hs256 => {
                return Err(invalid(
                    "the unnamed key is not HS256: only HS256 tokens can be minted here".into(),
                ));
            }
            None => hs256_secret(cfg, data_dir)?,
            Some(kid) => {
                let k =
                    cfg.keys.iter().find(|k| k.kid == kid).ok_or_else(|| {
                        invalid(format!("no [[auth.keys]] entry has kid {kid:?}"))
                    })?;
                if k.algorithm != JwtAlgorithm::Hs256 {
                    return Err(invalid(format!(
                        "key {kid:?} is not HS256: only HS256 tokens can be minted here"
                    )));
                }
                named_secret(k)?
            }
        };
        Ok(Self {
            secret,
            kid: kid.map(str::to_owned),
            audience: cfg.audience.clone(),
            issuer: cfg.issuer.clone(),
        })
    }

    /// A token for `user`, valid for `ttl`.
    ///
    /// # Errors
    /// When `user` is not a valid user id or signing fails.
    pub fn mint(&self, user: &str, ttl: Duration) -> Result<String, AuthError> {
        switchboard_protocol::validate::user_id(user)
            .map_err(|e| AuthError::BadSubject(e.to_string()))?;
        let now = jsonwebtoken::get_current_timestamp();
        let claims = MintedClaims {
            sub: user,
            exp: now + ttl.as_secs(),
            iat: now,
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid.clone_from(&self.kid);
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&self.secret))
            .map_err(|e| AuthError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Authenticator {
        fn verify_user(&self, token: &str) -> Result<String, AuthError> {
            self.verify(token).map(|v| v.user)
        }
    }

    fn auth(secret: &str) -> Authenticator {
        let cfg = AuthConfig { secret: Some(secret.into()), ..AuthConfig::default() };
        Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap()
    }

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn given_minted_token_should_verify_to_its_user() {
        let t = mint(SECRET.as_bytes(), "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth(SECRET).verify_user(&t), Ok("alice".to_owned()));
    }

    #[test]
    fn given_only_named_keys_when_minting_should_need_a_kid_and_never_show_the_secret() {
        let key = "a-named-key-secret-0123456789";
        let cfg = AuthConfig {
            keys: vec![KeyConfig {
                kid: "k1".into(),
                algorithm: JwtAlgorithm::Hs256,
                secret: Some(key.into()),
                secret_file: None,
                public_key_file: None,
            }],
            ..AuthConfig::default()
        };
        let dir = Path::new("/nonexistent");
        let err = Minter::from_config(&cfg, dir, None).unwrap_err();
        assert!(err.to_string().contains("--kid"), "{err}");
        let minter = Minter::from_config(&cfg, dir, Some("k1")).unwrap();
        assert!(!format!("{minter:?}").contains(key));
        let token = minter.mint("alice", Duration::from_secs(60)).unwrap();
        let verified = Authenticator::from_config(&cfg, dir).unwrap().verify(&token).unwrap();
        assert_eq!(verified.user, "alice");
    }

    #[test]
    fn given_token_signed_with_other_secret_should_reject_signature() {
        let t = mint(b"another-secret-0123456789", "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth(SECRET).verify_user(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn given_expired_token_beyond_leeway_should_reject_as_expired() {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({"sub": "alice", "exp": now - 120});
        let t = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth(SECRET).verify_user(&t), Err(AuthError::Expired));
    }

    #[test]
    fn given_token_without_exp_should_reject_missing_claim() {
        let t = jsonwebtoken::encode(
            &Header::default(),
            &serde_json::json!({"sub": "alice"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth(SECRET).verify_user(&t), Err(AuthError::MissingClaim("exp".into())));
    }

    #[test]
    fn given_alg_none_token_should_reject() {
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(auth(SECRET).verify_user(t).is_err());
    }

    #[test]
    fn given_invalid_subject_should_reject() {
        let t = jsonwebtoken::encode(
            &Header::default(),
            &serde_json::json!({"sub": "a:b", "exp": jsonwebtoken::get_current_timestamp() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(auth(SECRET).verify_user(&t), Err(AuthError::BadSubject(_))));
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    fn sign_with(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn claims() -> serde_json::Value {
        serde_json::json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() + 60})
    }

    #[test]
    fn given_public_key_algorithms_should_verify_tokens_signed_with_the_private_key() {
        for (alg, cfg_alg, key, public) in [
            (Algorithm::EdDSA, JwtAlgorithm::EdDsa, "ed25519.key.pem", "ed25519.pub.pem"),
            (Algorithm::RS256, JwtAlgorithm::Rs256, "rsa.key.pem", "rsa.pub.pem"),
        ] {
            let pem = std::fs::read(fixture(key)).unwrap();
            let enc = if alg == Algorithm::EdDSA {
                EncodingKey::from_ed_pem(&pem).unwrap()
            } else {
                EncodingKey::from_rsa_pem(&pem).unwrap()
            };
            let cfg = AuthConfig {
                algorithm: cfg_alg,
                public_key_file: Some(fixture(public)),
                ..AuthConfig::default()
            };
            let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
            assert_eq!(a.verify_user(&sign_with(alg, &enc, &claims())), Ok("alice".to_owned()));
        }
    }

    #[test]
    fn given_hs256_token_keyed_with_the_rsa_public_key_should_reject_algorithm_confusion() {
        let public = std::fs::read(fixture("rsa.pub.pem")).unwrap();
        let forged = sign_with(Algorithm::HS256, &EncodingKey::from_secret(&public), &claims());
        let cfg = AuthConfig {
            algorithm: JwtAlgorithm::Rs256,
            public_key_file: Some(fixture("rsa.pub.pem")),
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
        assert_eq!(a.verify_user(&forged), Err(AuthError::BadAlgorithm("HS256".into())));
    }

    #[test]
    fn given_configured_audience_and_issuer_should_require_them() {
        let cfg = AuthConfig {
            secret: Some(SECRET.into()),
            audience: Some("chat".into()),
            issuer: Some("https://auth.example".into()),
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let ok = serde_json::json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "https://auth.example"});
        assert_eq!(a.verify_user(&sign_with(Algorithm::HS256, &key, &ok)), Ok("a".to_owned()));
        let bad_aud = serde_json::json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://auth.example"});
        assert_eq!(
            a.verify_user(&sign_with(Algorithm::HS256, &key, &bad_aud)),
            Err(AuthError::BadAudience)
        );
        let bad_iss = serde_json::json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "evil"});
        assert_eq!(
            a.verify_user(&sign_with(Algorithm::HS256, &key, &bad_iss)),
            Err(AuthError::BadIssuer)
        );
    }

    #[test]
    fn given_expiry_within_leeway_should_accept() {
        let now = jsonwebtoken::get_current_timestamp();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let t = sign_with(
            Algorithm::HS256,
            &key,
            &serde_json::json!({"sub": "alice", "exp": now - 10}),
        );
        assert_eq!(auth(SECRET).verify_user(&t), Ok("alice".to_owned()));
    }

    #[test]
    fn given_claims_with_wrong_json_types_should_reject_invalid_claim() {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        for (claims, name) in [
            (serde_json::json!({"sub": "alice", "exp": exp.to_string()}), "exp"),
            (serde_json::json!({"sub": "alice", "exp": exp, "nbf": "0"}), "nbf"),
            (serde_json::json!({"sub": "alice", "exp": exp, "iat": true}), "iat"),
            (serde_json::json!({"sub": "alice", "exp": -5}), "exp"),
            (serde_json::json!({"sub": 7, "exp": exp}), "sub"),
        ] {
            let t = sign_with(Algorithm::HS256, &key, &claims);
            assert_eq!(auth(SECRET).verify_user(&t), Err(AuthError::InvalidClaim(name.into())));
        }
        // A fractional NumericDate is a number.
        let t = sign_with(Algorithm::HS256, &key, &serde_json::json!({"sub": "a", "exp": 1e10}));
        assert_eq!(auth(SECRET).verify_user(&t), Ok("a".into()));
    }

    #[test]
    fn given_alg_none_in_any_letter_case_should_reject_bad_algorithm() {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = URL_SAFE_NO_PAD.encode(r#"{"sub":"alice","exp":9999999999}"#);
        for alg in ["none", "None", "NONE", "nOnE", "HS512"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}"}}"#));
            let t = format!("{header}.{claims}.");
            assert_eq!(auth(SECRET).verify(&t), Err(AuthError::BadAlgorithm(alg.into())));
            assert_eq!(AuthError::BadAlgorithm(alg.into()).reason(), "bad_algorithm");
        }
    }

    fn with_kid(kid: &str, secret: &str) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(secret.as_bytes()))
            .unwrap()
    }

    #[test]
    fn given_named_keys_should_verify_by_kid_and_reject_unknown_kids() {
        const OLD: &str = "the-old-rotated-secret-0";
        const NEW: &str = "the-new-rotated-secret-1";
        let named = |kid: &str, secret: &str| crate::config::KeyConfig {
            kid: kid.into(),
            algorithm: JwtAlgorithm::Hs256,
            secret: Some(secret.into()),
            secret_file: None,
            public_key_file: None,
        };
        let cfg = AuthConfig {
            keys: vec![named("old", OLD), named("new", NEW)],
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
        assert_eq!(a.verify_user(&with_kid("old", OLD)), Ok("alice".into()));
        assert_eq!(a.verify_user(&with_kid("new", NEW)), Ok("alice".into()));
        assert_eq!(a.verify_user(&with_kid("new", OLD)), Err(AuthError::BadSignature));
        assert_eq!(
            a.verify_user(&with_kid("gone", OLD)),
            Err(AuthError::UnknownKid("gone".into()))
        );
        // Only named keys: a token without kid has no key.
        let t = mint(OLD.as_bytes(), "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(a.verify_user(&t), Err(AuthError::UnknownKid(String::new())));
        // A single unnamed key verifies tokens whatever their kid (providers always set one).
        assert_eq!(auth(SECRET).verify_user(&with_kid("old", SECRET)), Ok("alice".into()));
        assert_eq!(
            auth(SECRET).verify_user(&with_kid("old", OLD)),
            Err(AuthError::BadSignature),
            "but only with its own key"
        );
    }

    #[test]
    fn given_configured_audience_or_issuer_should_require_the_claim() {
        let cfg = AuthConfig {
            secret: Some(SECRET.into()),
            audience: Some("chat".into()),
            issuer: Some("iss".into()),
            ..AuthConfig::default()
        };
        let a = Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap();
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let no_aud = serde_json::json!({"sub": "a", "exp": exp, "iss": "iss"});
        assert_eq!(
            a.verify_user(&sign_with(Algorithm::HS256, &key, &no_aud)),
            Err(AuthError::MissingClaim("aud".into()))
        );
        let aud_list =
            serde_json::json!({"sub": "a", "exp": exp, "iss": "iss", "aud": ["x", "chat"]});
        assert_eq!(a.verify_user(&sign_with(Algorithm::HS256, &key, &aud_list)), Ok("a".into()));
        let no_iss = serde_json::json!({"sub": "a", "exp": exp, "aud": "chat"});
        assert_eq!(
            a.verify_user(&sign_with(Algorithm::HS256, &key, &no_iss)),
            Err(AuthError::MissingClaim("iss".into()))
        );
    }

    #[test]
    fn given_verified_token_should_report_its_exp() {
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let t = sign_with(Algorithm::HS256, &key, &serde_json::json!({"sub": "a", "exp": exp}));
        assert_eq!(auth(SECRET).verify(&t), Ok(Verified { user: "a".into(), expires_at: exp }));
        assert_eq!(session_deadline_ms(exp, 30), (exp + 30) * 1000);
    }

    #[test]
    fn given_no_configured_secret_should_generate_and_keep_one_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuthConfig::default();
        let a = hs256_secret(&cfg, dir.path()).unwrap();
        let b = hs256_secret(&cfg, dir.path()).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
