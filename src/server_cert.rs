//! The certificate the edge serves from files (`tls.cert_file`, `tls.key_file`), as certbot or
//! any other tool writes them: loading (a PEM full chain, leaf first, and its PEM private key,
//! checked to belong together) and [`FileCert`], the rustls certificate resolver whose
//! certificate can be replaced while handshakes go on.
//!
//! Construction only: reads the two files and parses them, opens no connection.
//! `Config::validate` loads them to check the pair at start, which is why this sits below the
//! configuration and not with the edge listeners in [`crate::tls`] (which owns the task that
//! reloads them when they change).

use rustls_acme::futures_rustls::pki_types::pem::{self, PemObject};
use rustls_acme::futures_rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_acme::rustls;
use rustls_acme::rustls::server::{ClientHello, ResolvesServerCert};
use rustls_acme::rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// What is wrong with a certificate or key file; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertFileError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file} holds no PEM certificate")]
    NoCertificate { file: String },
    #[error("{file}: bad PEM certificate: {source}")]
    BadCertificate { file: String, source: pem::Error },
    #[error("{file} holds no usable PEM private key: {source}")]
    BadKey { file: String, source: pem::Error },
    /// The key is of a kind the crypto provider cannot sign with, or is not the key of the
    /// first certificate of the chain.
    #[error("{key_file} does not go with {cert_file}: {source}")]
    Mismatch {
        cert_file: String,
        key_file: String,
        source: rustls::Error,
    },
}

/// A certificate chain and its key, loaded from files.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// Unix time (s) the first certificate expires; 0 when it cannot be read.
    pub not_after: i64,
}

/// Reads and checks a PEM chain (leaf first) and its PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Loaded, CertFileError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| CertFileError::Read {
            file: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert_file)?;
    let key_pem = read(key_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertFileError::BadCertificate {
            file: cert_file.display().to_string(),
            source,
        })?;
    let Some(leaf) = chain.first() else {
        return Err(CertFileError::NoCertificate {
            file: cert_file.display().to_string(),
        });
    };
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map_or(0, |(_, c)| c.validity().not_after.timestamp());
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| CertFileError::BadKey {
        file: key_file.display().to_string(),
        source,
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(|source| {
        CertFileError::Mismatch {
            cert_file: cert_file.display().to_string(),
            key_file: key_file.display().to_string(),
            source,
        }
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        not_after,
    })
}

/// The edge's certificate from files: every handshake gets the current one, whatever name it
/// asks for; [`FileCert::replace`] swaps it for later handshakes.
#[derive(Debug)]
pub struct FileCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl FileCert {
    pub fn new(key: Arc<CertifiedKey>) -> FileCert {
        FileCert {
            current: RwLock::new(key),
        }
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_pair_loads_and_mismatches_and_garbage_are_named() {
        let dir = std::env::temp_dir().join(format!("pushgate-server-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pair("a.test");
        let (_, other_key) = pair("b.test");
        let c = dir.join("fullchain.pem");
        let k = dir.join("privkey.pem");
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        let loaded = load(&c, &k).unwrap();
        assert!(loaded.not_after > 0);
        assert_eq!(loaded.key.cert.len(), 1);

        std::fs::write(&k, &other_key).unwrap();
        let e = load(&c, &k).unwrap_err().to_string();
        assert!(e.contains("does not go with"), "{e}");
        std::fs::write(&k, "not a key").unwrap();
        let e = load(&c, &k).unwrap_err().to_string();
        assert!(e.contains("no usable PEM private key"), "{e}");
        std::fs::write(&k, &key).unwrap();
        std::fs::write(&c, "nothing here").unwrap();
        let e = load(&c, &k).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = load(&dir.join("missing.pem"), &k).unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
