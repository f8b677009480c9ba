//! JWT verification (jsonwebtoken) and development token minting.
//!
//! Only the configured algorithm is accepted, so `alg: none` and algorithm confusion (an HS256
//! token signed with an RSA public key) fail signature checks. `exp` and `sub` are required,
//! `aud`/`iss` are checked when configured, and `exp`/`nbf` tolerate `leeway_secs` of skew.
//! `sub` must be a valid user id.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};

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
    /// The signature does not verify with the configured key and algorithm.
    #[error("invalid token signature or algorithm")]
    BadSignature,
    /// A required claim is missing.
    #[error("token is missing the `{0}` claim")]
    MissingClaim(String),
    /// `aud` does not match the configured audience.
    #[error("token audience is not accepted")]
    BadAudience,
    /// `iss` does not match the configured issuer.
    #[error("token issuer is not accepted")]
    BadIssuer,
    /// `sub` is not a valid user id.
    #[error("token subject is not a valid user id: {0}")]
    BadSubject(String),
    /// Anything else: not a JWT, bad base64 or JSON, wrong claim types.
    #[error("malformed token: {0}")]
    Malformed(String),
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
}

/// Claims as minted by `switchboard token`.
#[derive(Debug, Serialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: Option<u64>,
}

/// Claims as read: optional here so that a missing one is reported by the validation
/// (`MissingClaim`) instead of as malformed JSON.
#[derive(Debug, Deserialize)]
struct ReadClaims {
    sub: Option<String>,
}

/// Verifies tokens; cheap to share across shards.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("algorithms", &self.validation.algorithms).finish()
    }
}

fn algorithm(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::Hs256 => Algorithm::HS256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::EdDsa => Algorithm::EdDSA,
    }
}

impl Authenticator {
    /// Builds the verifier from the configuration, reading or generating key material.
    ///
    /// # Errors
    /// When a key file cannot be read or is invalid.
    pub fn from_config(cfg: &AuthConfig, data_dir: &Path) -> Result<Self, KeyError> {
        let key = match cfg.algorithm {
            JwtAlgorithm::Hs256 => DecodingKey::from_secret(&hs256_secret(cfg, data_dir)?),
            JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
                let path = cfg.public_key_file.clone().unwrap_or_default();
                let pem = std::fs::read(&path)
                    .map_err(|source| KeyError::Io { path: path.clone(), source })?;
                let key = if cfg.algorithm == JwtAlgorithm::Rs256 {
                    DecodingKey::from_rsa_pem(&pem)
                } else {
                    DecodingKey::from_ed_pem(&pem)
                };
                key.map_err(|e| KeyError::Invalid { path, message: e.to_string() })?
            }
        };
        let mut validation = Validation::new(algorithm(cfg.algorithm));
        validation.leeway = cfg.leeway_secs;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Self { key, validation })
    }

    /// Verifies a token and returns its user id.
    ///
    /// # Errors
    /// The reason the token is not accepted.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        let data = jsonwebtoken::decode::<ReadClaims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                    AuthError::BadSignature
                }
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
                ErrorKind::InvalidAudience => AuthError::BadAudience,
                ErrorKind::InvalidIssuer => AuthError::BadIssuer,
                _ => AuthError::Malformed(e.to_string()),
            },
        )?;
        let sub = data.claims.sub.ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
        switchboard_protocol::validate::user_id(&sub)
            .map_err(|e| AuthError::BadSubject(e.to_string()))?;
        Ok(sub)
    }
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

/// Mints an HS256 token for `user`, valid for `ttl`.
///
/// # Errors
/// When `user` is not a valid user id or signing fails.
pub fn mint(secret: &[u8], user: &str, ttl: Duration) -> Result<String, AuthError> {
    switchboard_protocol::validate::user_id(user)
        .map_err(|e| AuthError::BadSubject(e.to_string()))?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims { sub: user.to_owned(), exp: now + ttl.as_secs(), iat: Some(now) };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .map_err(|e| AuthError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: &str) -> Authenticator {
        let cfg = AuthConfig { secret: Some(secret.into()), ..AuthConfig::default() };
        Authenticator::from_config(&cfg, Path::new("/nonexistent")).unwrap()
    }

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn given_minted_token_should_verify_to_its_user() {
        let t = mint(SECRET.as_bytes(), "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth(SECRET).verify(&t), Ok("alice".to_owned()));
    }

    #[test]
    fn given_token_signed_with_other_secret_should_reject_signature() {
        let t = mint(b"another-secret-0123456789", "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(auth(SECRET).verify(&t), Err(AuthError::BadSignature));
    }

    #[test]
    fn given_expired_token_beyond_leeway_should_reject_as_expired() {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims { sub: "alice".into(), exp: now - 120, iat: None };
        let t = jsonwebtoken::encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth(SECRET).verify(&t), Err(AuthError::Expired));
    }

    #[test]
    fn given_token_without_exp_should_reject_missing_claim() {
        let t = jsonwebtoken::encode(
            &Header::default(),
            &serde_json::json!({"sub": "alice"}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert_eq!(auth(SECRET).verify(&t), Err(AuthError::MissingClaim("exp".into())));
    }

    #[test]
    fn given_alg_none_token_should_reject() {
        // {"alg":"none","typ":"JWT"} . {"sub":"alice","exp":9999999999} . (empty)
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(auth(SECRET).verify(t).is_err());
    }

    #[test]
    fn given_invalid_subject_should_reject() {
        let t = jsonwebtoken::encode(
            &Header::default(),
            &serde_json::json!({"sub": "a:b", "exp": jsonwebtoken::get_current_timestamp() + 60}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(matches!(auth(SECRET).verify(&t), Err(AuthError::BadSubject(_))));
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
            assert_eq!(a.verify(&sign_with(alg, &enc, &claims())), Ok("alice".to_owned()));
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
        assert_eq!(a.verify(&forged), Err(AuthError::BadSignature));
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
        assert_eq!(a.verify(&sign_with(Algorithm::HS256, &key, &ok)), Ok("a".to_owned()));
        let bad_aud = serde_json::json!({"sub": "a", "exp": exp, "aud": "other", "iss": "https://auth.example"});
        assert_eq!(
            a.verify(&sign_with(Algorithm::HS256, &key, &bad_aud)),
            Err(AuthError::BadAudience)
        );
        let bad_iss = serde_json::json!({"sub": "a", "exp": exp, "aud": "chat", "iss": "evil"});
        assert_eq!(
            a.verify(&sign_with(Algorithm::HS256, &key, &bad_iss)),
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
        assert_eq!(auth(SECRET).verify(&t), Ok("alice".to_owned()));
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
