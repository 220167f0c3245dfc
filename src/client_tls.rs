//! The TLS client configuration for pushgate's own outgoing HTTPS: forwarded pushes
//! (`forward.root_ca_file`) and the ACME client (`acme.root_ca_file`). The public roots
//! (webpki-roots), plus the PEM certificates of a private CA when a file is named.
//!
//! Construction only: reads the CA file, builds a rustls `ClientConfig` (ring), opens no
//! connection. `Config::validate` builds one to check `forward.root_ca_file`, which is why
//! this sits below the configuration and not with the edge listeners in [`crate::tls`].

use rustls_acme::futures_rustls::pki_types::CertificateDer;
use rustls_acme::futures_rustls::pki_types::pem::{self, PemObject};
use rustls_acme::rustls::{self, ClientConfig, RootCertStore};
use std::sync::Arc;

/// Why [`client_config`] failed: the config `key` that names the CA file, then the problem
/// (`forward.root_ca_file: cannot read ...`).
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct RootCaError {
    /// The config key of the CA file (`forward.root_ca_file`, `acme.root_ca_file`).
    pub key: &'static str,
    pub problem: RootCaProblem,
}

/// What is wrong with a CA file, without the key that named it.
#[derive(Debug, thiserror::Error)]
pub enum RootCaProblem {
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file} holds no usable PEM certificate: {source}")]
    Pem { file: String, source: pem::Error },
    #[error("{file} holds no usable PEM certificate: {source}")]
    Rejected { file: String, source: rustls::Error },
    #[error("{file} holds no usable PEM certificate")]
    Empty { file: String },
    /// The crypto provider supports none of rustls's safe protocol versions.
    #[error("{0}")]
    Protocols(rustls::Error),
}

/// A TLS client configuration (ring) trusting the public roots (webpki-roots) plus the PEM
/// certificates in `root_ca_file` when it is not empty; problems name the config `key`.
pub fn client_config(
    key: &'static str,
    root_ca_file: &str,
) -> Result<Arc<ClientConfig>, RootCaError> {
    let fail = |problem| RootCaError { key, problem };
    let file = || root_ca_file.to_string();
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !root_ca_file.is_empty() {
        let pem = std::fs::read(root_ca_file).map_err(|source| {
            fail(RootCaProblem::Read {
                file: file(),
                source,
            })
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|source| {
                fail(RootCaProblem::Pem {
                    file: file(),
                    source,
                })
            })?;
            roots.add(cert).map_err(|source| {
                fail(RootCaProblem::Rejected {
                    file: file(),
                    source,
                })
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(fail(RootCaProblem::Empty { file: file() }));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail(RootCaProblem::Protocols(e)))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_roots_need_no_file() {
        client_config("forward.root_ca_file", "").unwrap();
    }

    #[test]
    fn problems_name_the_key_and_the_file() {
        let dir = std::env::temp_dir().join(format!("pushgate-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem").display().to_string();
        let e = client_config("acme.root_ca_file", &missing).unwrap_err();
        assert!(matches!(e.problem, RootCaProblem::Read { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("acme.root_ca_file: cannot read {missing}: ")),
            "{e}"
        );
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let empty = empty.display().to_string();
        let e = client_config("forward.root_ca_file", &empty).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("forward.root_ca_file: {empty} holds no usable PEM certificate")
        );
        assert_eq!(
            e.problem.to_string(),
            format!("{empty} holds no usable PEM certificate")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
