//! Bearer-token authentication and the read/admin scope check.
//!
//! Two kinds of token: static API tokens from the configuration (compared in constant time on
//! their SHA-256 digests) and JWTs (HS256 with a shared secret or ES384 with a P-384 public key;
//! `exp` required, `nbf` checked, scope from a `scope` claim that is an array or a space-separated
//! string). Verified JWTs are cached by the digest of the token until they expire, since ES384
//! verification is costly at high request rates. A read token may use GET and HEAD only.
//!
//! Open without a token: `/health`, `/docs*`, `/openapi.json`, and `POST /nodes/join` (which
//! carries its own join token in the body).

use crate::config::{JwtConfig, Scope, TokenConfig};
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// Verified JWTs kept at most.
pub const JWT_CACHE_CAPACITY: usize = 10_000;

/// What can go wrong setting up authentication.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The ES384 public key is not a valid PEM EC key.
    #[error("jwt es384_public_key_pem is not a valid pem ec public key: {0}")]
    BadPublicKey(jsonwebtoken::errors::Error),
    /// The HS256 secret is empty.
    #[error("jwt hs256_secret is empty")]
    EmptySecret,
}

/// Who made a request, and what they may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name (static tokens) or the JWT's `sub` (or "jwt").
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

struct StaticToken {
    name: String,
    digest: [u8; 32],
    scope: Scope,
}

struct JwtVerifier {
    hs256: Option<DecodingKey>,
    es384: Option<DecodingKey>,
    admin_scopes: Vec<String>,
    read_scopes: Vec<String>,
}

#[derive(Clone)]
struct Cached {
    principal: Principal,
    exp: u64,
}

/// Checks bearer tokens.
pub struct Authenticator {
    statics: Vec<StaticToken>,
    jwt: Option<JwtVerifier>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("static_tokens", &self.statics.len())
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeClaim {
    Words(String),
    List(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<ScopeClaim>,
}

impl Authenticator {
    /// Builds the checker from the configured static tokens and JWT settings.
    pub fn new(tokens: &[TokenConfig], jwt: Option<&JwtConfig>) -> Result<Self, AuthError> {
        let statics = tokens
            .iter()
            .map(|t| StaticToken {
                name: t.name.clone(),
                digest: digest(t.token.as_bytes()),
                scope: t.scope,
            })
            .collect();
        let jwt = match jwt {
            None => None,
            Some(c) => {
                let hs256 = match &c.hs256_secret {
                    Some(s) if s.is_empty() => return Err(AuthError::EmptySecret),
                    Some(s) => Some(DecodingKey::from_secret(s.as_bytes())),
                    None => None,
                };
                let es384 = c
                    .es384_public_key_pem
                    .as_ref()
                    .map(|pem| DecodingKey::from_ec_pem(pem.as_bytes()))
                    .transpose()
                    .map_err(AuthError::BadPublicKey)?;
                Some(JwtVerifier {
                    hs256,
                    es384,
                    admin_scopes: c.admin_scopes.clone(),
                    read_scopes: c.read_scopes.clone(),
                })
            }
        };
        Ok(Self {
            statics,
            jwt,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether no token of any kind is configured (every protected request then gets 401).
    pub fn is_empty(&self) -> bool {
        self.statics.is_empty() && self.jwt.is_none()
    }

    /// Checks the value of an `Authorization` header.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let header = authorization
            .ok_or_else(|| ApiError::Unauthorized("missing bearer token".to_string()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("authorization header is not a bearer token".to_string())
            })?;
        let d = digest(token.as_bytes());
        // Compare with every static token, without stopping at a match.
        let mut found: Option<&StaticToken> = None;
        for s in &self.statics {
            if bool::from(s.digest.ct_eq(&d)) {
                found = Some(s);
            }
        }
        if let Some(s) = found {
            return Ok(Principal {
                name: s.name.clone(),
                scope: s.scope,
            });
        }
        let Some(jwt) = &self.jwt else {
            return Err(ApiError::Unauthorized("invalid token".to_string()));
        };
        let now = now_secs();
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(&d)
            && c.exp > now
        {
            return Ok(c.principal.clone());
        }
        let (principal, exp) = self.verify_jwt(jwt, token)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= JWT_CACHE_CAPACITY {
                cache.retain(|_, c| c.exp > now);
                if cache.len() >= JWT_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(
                d,
                Cached {
                    principal: principal.clone(),
                    exp,
                },
            );
        }
        Ok(principal)
    }

    fn verify_jwt(&self, jwt: &JwtVerifier, token: &str) -> Result<(Principal, u64), ApiError> {
        let invalid = |why: String| ApiError::Unauthorized(format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::Unauthorized("invalid token".to_string()))?;
        let key = match header.alg {
            Algorithm::HS256 => jwt.hs256.as_ref(),
            Algorithm::ES384 => jwt.es384.as_ref(),
            _ => None,
        }
        .ok_or_else(|| invalid(format!("algorithm {:?} is not accepted", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => invalid("the token has expired".to_string()),
                ErrorKind::ImmatureSignature => invalid("the token is not valid yet".to_string()),
                ErrorKind::InvalidSignature => invalid("bad signature".to_string()),
                ErrorKind::MissingRequiredClaim(c) => invalid(format!("missing claim {c}")),
                _ => invalid("cannot verify it".to_string()),
            }
        })?;
        let claims = data.claims;
        let scopes: Vec<String> = match claims.scope {
            None => Vec::new(),
            Some(ScopeClaim::Words(s)) => s.split_whitespace().map(str::to_string).collect(),
            Some(ScopeClaim::List(v)) => v,
        };
        let name = claims.sub.unwrap_or_else(|| "jwt".to_string());
        let scope = if scopes.iter().any(|s| jwt.admin_scopes.contains(s)) {
            Scope::Admin
        } else if scopes.iter().any(|s| jwt.read_scopes.contains(s)) {
            Scope::Read
        } else {
            return Err(ApiError::Forbidden(format!(
                "token {name} has no grid scope (expected one of {})",
                jwt.admin_scopes
                    .iter()
                    .chain(&jwt.read_scopes)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        Ok((Principal { name, scope }, claims.exp))
    }
}

/// Whether a request may go without a token.
pub fn is_public(method: &Method, path: &str) -> bool {
    path == "/health"
        || path == "/openapi.json"
        || path == "/docs"
        || path.starts_with("/docs/")
        || (method == Method::POST && path == "/nodes/join")
}

/// Whether `principal` may make a request with `method`.
pub fn check_scope(principal: &Principal, method: &Method) -> Result<(), ApiError> {
    match principal.scope {
        Scope::Admin => Ok(()),
        Scope::Read if method == Method::GET || method == Method::HEAD => Ok(()),
        Scope::Read => Err(ApiError::Forbidden(format!(
            "token {} has scope read; this request needs admin",
            principal.name
        ))),
    }
}

/// Middleware: authenticates and checks the scope of every non-public request; the
/// [`Principal`] is put in the request's extensions.
pub async fn require_auth(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if is_public(req.method(), req.uri().path()) {
        return Ok(next.run(req).await);
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::Unauthorized("invalid token".to_string()))
        })
        .transpose()?;
    let principal = auth.authenticate(header)?;
    check_scope(&principal, req.method())?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn auth() -> Authenticator {
        Authenticator::new(
            &[TokenConfig {
                name: "ro".into(),
                token: "read-secret".into(),
                scope: Scope::Read,
            }],
            Some(&JwtConfig {
                hs256_secret: Some("hs-secret".into()),
                es384_public_key_pem: None,
                admin_scopes: vec!["grid:admin".into()],
                read_scopes: vec!["grid:read".into()],
            }),
        )
        .expect("valid auth config")
    }

    fn hs(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"hs-secret"),
        )
        .expect("encode")
    }

    #[test]
    fn static_token_and_scope() {
        let a = auth();
        let p = a
            .authenticate(Some("Bearer read-secret"))
            .expect("static token");
        assert_eq!(p.scope, Scope::Read);
        assert!(check_scope(&p, &Method::GET).is_ok());
        let e = check_scope(&p, &Method::POST).expect_err("read on post");
        assert_eq!(
            e.to_string(),
            "token ro has scope read; this request needs admin"
        );
        assert!(matches!(
            a.authenticate(Some("Bearer nope")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authenticate(None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authenticate(Some("Basic abc")),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn jwt_scope_as_string_or_list_and_cache() {
        let a = auth();
        let exp = now_secs() + 600;
        let t = hs(json!({"sub": "alice", "exp": exp, "scope": "openid grid:admin"}));
        let p = a.authenticate(Some(&format!("Bearer {t}"))).expect("jwt");
        assert_eq!(
            p,
            Principal {
                name: "alice".into(),
                scope: Scope::Admin
            }
        );
        assert_eq!(a.cache.lock().expect("lock").len(), 1);
        // Served from the cache the second time.
        assert_eq!(
            a.authenticate(Some(&format!("Bearer {t}")))
                .expect("cached"),
            p
        );
        let t = hs(json!({"exp": exp, "scope": ["grid:read"]}));
        let p = a
            .authenticate(Some(&format!("Bearer {t}")))
            .expect("jwt list");
        assert_eq!(p.scope, Scope::Read);
        assert_eq!(p.name, "jwt");
        let t = hs(json!({"exp": exp, "scope": "other"}));
        assert!(matches!(
            a.authenticate(Some(&format!("Bearer {t}"))),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn jwt_expired_immature_or_without_exp_is_refused() {
        let a = auth();
        let now = now_secs();
        for claims in [
            json!({"exp": now - 3600, "scope": "grid:admin"}),
            json!({"exp": now + 3600, "nbf": now + 1800, "scope": "grid:admin"}),
            json!({"scope": "grid:admin"}),
        ] {
            let t = hs(claims.clone());
            assert!(
                matches!(
                    a.authenticate(Some(&format!("Bearer {t}"))),
                    Err(ApiError::Unauthorized(_))
                ),
                "{claims}"
            );
        }
        let wrong = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"exp": now + 60, "scope": "grid:admin"}),
            &EncodingKey::from_secret(b"other"),
        )
        .expect("encode");
        assert!(matches!(
            a.authenticate(Some(&format!("Bearer {wrong}"))),
            Err(ApiError::Unauthorized(_))
        ));
    }

    #[test]
    fn public_paths() {
        assert!(is_public(&Method::GET, "/health"));
        assert!(is_public(&Method::GET, "/docs/index.html"));
        assert!(is_public(&Method::POST, "/nodes/join"));
        assert!(!is_public(&Method::GET, "/nodes/join"));
        assert!(!is_public(&Method::GET, "/docsx"));
        assert!(!is_public(&Method::GET, "/nodes"));
    }
}
