//! The ACME challenges open right now, as the ACME task ([`crate::acme`]) publishes them and the
//! listeners answer them: HTTP-01 key authorizations (`/.well-known/acme-challenge/<token>`,
//! answered by [`crate::router`] and the HTTPS redirect) and, through the certificate resolver,
//! TLS-ALPN-01 and the current certificate ([`crate::tls`]).
//!
//! Architecture Invariant: state only. It knows nothing of HTTP or of the ACME task, so the
//! shared context ([`crate::app::App`]) can hold it without depending on either.

use rustls_acme::ResolvesServerCertAcme;
use std::sync::{Arc, OnceLock};

/// Where HTTP-01 challenges are asked for.
pub const CHALLENGE_PATH_PREFIX: &str = "/.well-known/acme-challenge/";

/// What the HTTP router and the TLS listener need from the ACME task.
#[derive(Debug, Default)]
pub struct Challenges {
    /// Set once the ACME task has started; holds the current challenge.
    resolver: OnceLock<Arc<ResolvesServerCertAcme>>,
}

impl Challenges {
    /// The key authorization for an HTTP-01 challenge `token`, while that challenge is open.
    pub fn key_authorization(&self, token: &str) -> Option<String> {
        self.resolver.get()?.get_http_01_key_auth(token)
    }

    /// The certificate resolver for a TLS listener: the current certificate, or the
    /// TLS-ALPN-01 challenge certificate for a handshake offering only `acme-tls/1`. `None`
    /// until the ACME task has started.
    pub fn resolver(&self) -> Option<Arc<ResolvesServerCertAcme>> {
        self.resolver.get().cloned()
    }

    /// Called once by the ACME task when it starts (a second call changes nothing).
    pub fn set_resolver(&self, resolver: Arc<ResolvesServerCertAcme>) {
        let _ = self.resolver.set(resolver);
    }
}
