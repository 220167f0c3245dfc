//! Private topics and connect tokens (`auth`): the `*` patterns and the JWT checks.
//!
//! Input: a mode byte, a byte index, then NUL-separated parts: the secret, the private topic
//! patterns (one a line), the topic, then either granted channel patterns (one a line) or a
//! token as a client would present it.
//! Properties:
//! - `glob_match` agrees with a reference matcher (`*` any run of characters, anything else
//!   itself) for every pattern against the topic;
//! - a token minted with the secret opens a private topic exactly when one of its channels
//!   matches it, whether presented as the authToken or as the `token` connect param, and gives
//!   its `sub`; the same token with any one character changed opens nothing private;
//! - any other string presented as a token opens a private topic only if it is an HS256 JWT
//!   signed with the secret, unexpired, whose channels claim grants the topic;
//! - a public topic needs nothing.
#![no_main]

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use libfuzzer_sys::fuzz_target;
use pushgate::auth::{self, Auth, ConnectInfo};
use pushgate::config::AuthConfig;
use pushgate_fuzz::Cursor;

/// `*` matches any run of bytes (of characters: patterns split at `*`, an ASCII byte, so
/// literal parts begin and end on character boundaries).
fn glob(p: &[u8], t: &[u8]) -> bool {
    // reach[j]: the pattern so far matches t[..j].
    let mut reach = vec![false; t.len() + 1];
    reach[0] = true;
    for &c in p {
        let mut next = vec![false; t.len() + 1];
        if c == b'*' {
            let mut any = false;
            for j in 0..=t.len() {
                any |= reach[j];
                next[j] = any;
            }
        } else {
            for j in 0..t.len() {
                next[j + 1] = reach[j] && t[j] == c;
            }
        }
        reach = next;
    }
    reach[t.len()]
}

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

fn by_auth_token(t: &str) -> ConnectInfo {
    ConnectInfo {
        query: "vsn=2.0.0".into(),
        auth_token: Some(t.into()),
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    channels: Option<Vec<String>>,
}

fuzz_target!(|input: &[u8]| {
    let mut c = Cursor::new(input);
    let mode = c.byte();
    let at = c.u16() as usize;
    let secret = String::from_utf8_lossy(c.until(0)).into_owned();
    let private = lines(c.until(0));
    let topic = String::from_utf8_lossy(c.until(0)).into_owned();
    let rest = c.rest();

    for p in &private {
        assert_eq!(
            auth::glob_match(p, &topic),
            glob(p.as_bytes(), topic.as_bytes()),
            "{p:?} against {topic:?}"
        );
    }
    let a = Auth::new(&AuthConfig {
        secret: secret.clone(),
        private_topics: private.clone(),
    });
    let is_private = private.iter().any(|p| glob(p.as_bytes(), topic.as_bytes()));
    assert_eq!(a.is_private(&topic), is_private);
    let nothing = ConnectInfo {
        query: String::new(),
        auth_token: None,
    };
    assert_eq!(a.may_join(&nothing, &topic).is_ok(), !is_private);
    let keyed = !secret.is_empty();

    if mode & 1 == 0 {
        let channels = lines(rest);
        let sub = (mode & 2 == 0).then_some("user-7");
        let Ok(token) = auth::mint(&secret, sub, &channels, 3600) else {
            return;
        };
        let grants = channels
            .iter()
            .any(|p| glob(p.as_bytes(), topic.as_bytes()));
        let want = !is_private || (keyed && grants);
        let by_param = ConnectInfo {
            query: format!("vsn=2.0.0&token={token}"),
            auth_token: None,
        };
        for connect in [by_auth_token(&token), by_param] {
            assert_eq!(a.may_join(&connect, &topic).is_ok(), want, "{token}");
            assert_eq!(a.subject(&connect).as_deref(), sub.filter(|_| keyed));
        }
        // One character changed: a different token, which must open nothing private.
        let i = at % token.len();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";
        let old = token.as_bytes()[i];
        let new = alphabet[(alphabet.iter().position(|b| *b == old).unwrap_or(0)
            + 1
            + mode as usize % (alphabet.len() - 1))
            % alphabet.len()];
        let mut tampered = token.clone().into_bytes();
        tampered[i] = new;
        let tampered = String::from_utf8(tampered).unwrap();
        if tampered != token && is_private {
            assert!(
                a.may_join(&by_auth_token(&tampered), &topic).is_err(),
                "a tampered token opened {topic:?}: {tampered}"
            );
        }
    } else {
        let token = String::from_utf8_lossy(rest).into_owned();
        let ok = a.may_join(&by_auth_token(&token), &topic).is_ok();
        if ok && is_private {
            let mut v = Validation::new(Algorithm::HS256);
            v.validate_aud = false;
            let claims = jsonwebtoken::decode::<Claims>(
                &token,
                &DecodingKey::from_secret(secret.as_bytes()).expect("an HMAC key"),
                &v,
            )
            .expect("a private topic opened by a token that does not verify");
            let granted = claims.claims.channels.expect("a channels claim");
            assert!(granted.iter().any(|p| glob(p.as_bytes(), topic.as_bytes())));
        }
    }
});
