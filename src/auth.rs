//! Private topics and connect tokens (`[auth]`).
//!
//! A topic is public unless it matches one of `auth.private_topics`. Joining a private topic
//! needs a connect token: a JWT signed with `auth.secret` (HS256 only), with an `exp` and a
//! `channels` claim listing the topic patterns it grants. The client presents it as the phoenix.js
//! `authToken` (1.8+; the WebSocket subprotocol or the LongPoll `X-Phoenix-AuthToken` header) or
//! as the `token` connect param (`new Socket("/socket", {params: {token}})`). It is checked at
//! every join of a private topic (signature, `exp` and `nbf` with 60 s of leeway, grant); a
//! joined channel stays joined until it leaves or the connection ends.
//!
//! Patterns: `*` stands for any run of characters (`:` included), everything else for itself:
//! `user:*`, `private-*`, `*` (every topic), `room:lobby`.
//!
//! What a client presented when it connected ([`ConnectInfo`]: its query string and
//! `authToken`, bounded) is defined here, below the session and the transports that keep and
//! fill it, because authorization is what it is kept for.
//!
//! Pure: no I/O. JWT decoding and verification are the `jsonwebtoken` crate's.

use crate::config::AuthConfig;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

/// Longest query string a connect may carry, in bytes: it is kept for the connection's life
/// ([`ConnectInfo`]). 8 KiB is also the longest request line nginx passes by default
/// (`large_client_header_buffers`), so nothing nginx lets through is refused here.
pub const MAX_CONNECT_QUERY_BYTES: usize = 8192;
/// Longest auth token (phoenix.js `authToken`) a connect may carry, in bytes; kept like the
/// query string. A connect token (a JWT with a few channel patterns) is a few hundred bytes.
pub const MAX_AUTH_TOKEN_BYTES: usize = 4096;

/// Leeway on a token's `exp` and `nbf`, in seconds: the clocks of the app that mints tokens
/// and of this node may disagree by this much (jsonwebtoken's default, named here).
pub const CLOCK_LEEWAY_SECS: u64 = 60;

/// What the client presented when connecting; kept for authorization.
#[derive(Debug, Default, Clone)]
pub struct ConnectInfo {
    /// The raw query string of the connect request.
    pub query: String,
    /// The phoenix.js `authToken`, if one was offered.
    pub auth_token: Option<String>,
}

/// Why a connect was refused: what it presented is longer than we keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oversized {
    /// The query string is over [`MAX_CONNECT_QUERY_BYTES`].
    Query,
    /// The auth token is over [`MAX_AUTH_TOKEN_BYTES`].
    AuthToken,
}

impl Oversized {
    /// The reason given to the client.
    pub fn reason(self) -> String {
        match self {
            Oversized::Query => {
                format!("query string longer than {MAX_CONNECT_QUERY_BYTES} bytes")
            }
            Oversized::AuthToken => format!("auth token longer than {MAX_AUTH_TOKEN_BYTES} bytes"),
        }
    }
}

impl ConnectInfo {
    /// What a client presented, to be kept for its connection's life, if within the bounds.
    pub fn bounded(query: &str, auth_token: Option<&str>) -> Result<ConnectInfo, Oversized> {
        if query.len() > MAX_CONNECT_QUERY_BYTES {
            return Err(Oversized::Query);
        }
        if auth_token.is_some_and(|t| t.len() > MAX_AUTH_TOKEN_BYTES) {
            return Err(Oversized::AuthToken);
        }
        Ok(ConnectInfo {
            query: query.to_string(),
            auth_token: auth_token.map(str::to_string),
        })
    }
}

/// The `[auth]` rules, ready to check joins.
pub struct Auth {
    private: Vec<String>,
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("private", &self.private)
            .field("key", &self.key.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// Why a join of a private topic was refused: the `detail` of the error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    channels: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Subject {
    #[serde(default)]
    sub: Option<String>,
}

impl Auth {
    /// `config` has been validated: a secret is set whenever a topic is private.
    pub fn new(config: &AuthConfig) -> Auth {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        Auth {
            private: config.private_topics.clone(),
            key: (!config.secret.is_empty())
                .then(|| DecodingKey::from_secret(config.secret.as_bytes()).ok())
                .flatten(),
            validation,
        }
    }

    /// Whether joining `topic` needs a token.
    pub fn is_private(&self, topic: &str) -> bool {
        self.private.iter().any(|p| glob_match(p, topic))
    }

    /// The `sub` claim of the client's connect token, when it presented one that verifies.
    pub fn subject(&self, connect: &ConnectInfo) -> Option<String> {
        let token = connect_token(connect)?;
        let key = self.key.as_ref()?;
        jsonwebtoken::decode::<Subject>(token, key, &self.validation)
            .ok()?
            .claims
            .sub
            .filter(|s| !s.is_empty())
    }

    /// Whether the client that connected with `connect` may join `topic`.
    pub fn may_join(&self, connect: &ConnectInfo, topic: &str) -> Result<(), Refusal> {
        if !self.is_private(topic) {
            return Ok(());
        }
        let refuse = |why: &str| Err(Refusal(why.to_string()));
        let Some(token) = connect_token(connect) else {
            return refuse(
                "a private topic: connect with a token (the authToken option or a token param)",
            );
        };
        let Some(key) = &self.key else {
            return refuse("private topics are not set up on this server (auth.secret)");
        };
        let claims = match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => data.claims,
            Err(e) => {
                return refuse(match e.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid (nbf)",
                    ErrorKind::MissingRequiredClaim(_) => "token has no exp claim",
                    ErrorKind::InvalidSignature => "token signature does not verify",
                    ErrorKind::InvalidAlgorithm => "token must be signed with HS256",
                    _ => "token is not a valid JWT",
                });
            }
        };
        match claims.channels {
            Some(granted) if granted.iter().any(|p| glob_match(p, topic)) => Ok(()),
            Some(_) => refuse("token does not grant this topic (channels claim)"),
            None => refuse("token has no channels claim"),
        }
    }
}

/// Why [`mint`] could not sign a token: the JWT library's own error, shown as it words it.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct MintError(#[from] jsonwebtoken::errors::Error);

/// A connect token granting `channels` for `ttl_secs`: what `pushgate token` prints (your
/// backend mints its own with any JWT library).
pub fn mint(
    secret: &str,
    sub: Option<&str>,
    channels: &[String],
    ttl_secs: u64,
) -> Result<String, MintError> {
    let mut claims = serde_json::json!({
        "channels": channels,
        "exp": jsonwebtoken::get_current_timestamp() + ttl_secs,
    });
    if let Some(sub) = sub {
        claims["sub"] = sub.into();
    }
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

/// The token a client connected with: the phoenix.js `authToken`, else the first `token` query
/// value (LongPoll appends its own session token after the client's params, as the last one).
pub fn connect_token(connect: &ConnectInfo) -> Option<&str> {
    if let Some(t) = connect.auth_token.as_deref().filter(|t| !t.is_empty()) {
        return Some(t);
    }
    crate::query::query_values(&connect.query, "token")
        .next()
        .filter(|v| !v.is_empty())
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let Some((head, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut text) = text.strip_prefix(head) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let tail = parts.pop().unwrap_or("");
    for part in parts {
        match text.find(part) {
            Some(i) => text = &text[i + part.len()..],
            None => return false,
        }
    }
    text.len() >= tail.len() && text.ends_with(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(private: &[&str]) -> Auth {
        Auth::new(&AuthConfig {
            secret: SECRET.into(),
            private_topics: private.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn token_with(alg: Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn token(claims: serde_json::Value) -> String {
        token_with(Algorithm::HS256, SECRET, claims)
    }

    fn by_param(token: &str) -> ConnectInfo {
        ConnectInfo {
            query: format!("token={token}&vsn=2.0.0"),
            auth_token: None,
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "room:lobby"));
        assert!(glob_match("user:*", "user:42"));
        assert!(glob_match("user:*", "user:"));
        assert!(!glob_match("user:*", "users:42"));
        assert!(glob_match("*:secret", "room:secret"));
        assert!(!glob_match("*:secret", "room:secret2"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(glob_match("a*b*c", "a-b-b-c"));
        assert!(!glob_match("a*b*c", "a-c-b"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("room:lobby", "room:lobby"));
        assert!(!glob_match("room:lobby", "room:lobby2"));
    }

    #[test]
    fn minted_tokens_open_what_they_grant() {
        let a = auth(&["*"]);
        let t = mint(SECRET, Some("42"), &["user:42".to_string()], 60).unwrap();
        assert_eq!(a.may_join(&by_param(&t), "user:42"), Ok(()));
        assert!(a.may_join(&by_param(&t), "user:43").is_err());
    }

    #[test]
    fn public_topics_need_nothing() {
        let a = auth(&["user:*"]);
        assert_eq!(a.may_join(&ConnectInfo::default(), "room:lobby"), Ok(()));
        assert!(a.may_join(&ConnectInfo::default(), "user:1").is_err());
        let none = Auth::new(&AuthConfig::default());
        assert_eq!(none.may_join(&ConnectInfo::default(), "user:1"), Ok(()));
    }

    #[test]
    fn a_valid_token_grants_its_channels_only() {
        let a = auth(&["user:*", "team:*"]);
        let t = token(serde_json::json!({"exp": now() + 600, "channels": ["user:42", "team:*"]}));
        for c in [
            by_param(&t),
            ConnectInfo {
                query: "vsn=2.0.0".into(),
                auth_token: Some(t.clone()),
            },
            // LongPoll: the client's token first, the session token last.
            ConnectInfo {
                query: format!("token={t}&vsn=2.0.0&token=SESSION"),
                auth_token: None,
            },
        ] {
            assert_eq!(a.may_join(&c, "user:42"), Ok(()), "{c:?}");
            assert_eq!(a.may_join(&c, "team:red"), Ok(()));
            let refused = a.may_join(&c, "user:43").unwrap_err();
            assert!(refused.0.contains("does not grant"), "{refused:?}");
        }
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        let a = auth(&["*"]);
        let cases = [
            (
                token(serde_json::json!({"exp": now() - 3600, "channels": ["*"]})),
                "expired",
            ),
            (
                token(
                    serde_json::json!({"exp": now() + 600, "nbf": now() + 3600, "channels": ["*"]}),
                ),
                "not yet valid",
            ),
            (token(serde_json::json!({"channels": ["*"]})), "no exp"),
            (
                token(serde_json::json!({"exp": now() + 600})),
                "no channels",
            ),
            (
                token_with(
                    Algorithm::HS256,
                    "another-secret-another-secret-xx",
                    serde_json::json!({"exp": now() + 600, "channels": ["*"]}),
                ),
                "signature",
            ),
            (
                token_with(
                    Algorithm::HS512,
                    SECRET,
                    serde_json::json!({"exp": now() + 600, "channels": ["*"]}),
                ),
                "HS256",
            ),
            ("not-a-jwt".to_string(), "not a valid JWT"),
        ];
        for (t, why) in cases {
            let refused = a.may_join(&by_param(&t), "room:lobby").unwrap_err();
            assert!(refused.0.contains(why), "{why}: {refused:?}");
        }
        // "alg": "none" (an unsigned token) is never accepted.
        let unsigned = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(format!(r#"{{"exp":{},"channels":["*"]}}"#, now() + 600).as_bytes())
        );
        assert!(a.may_join(&by_param(&unsigned), "room:lobby").is_err());
        let missing = a
            .may_join(&ConnectInfo::default(), "room:lobby")
            .unwrap_err();
        assert!(missing.0.contains("connect with a token"), "{missing:?}");
    }

    fn base64_url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }
}
