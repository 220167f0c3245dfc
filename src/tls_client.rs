//! TLS client configurations for pushgate's own outgoing connections (the ACME CA and the
//! forwarding endpoint): ring, the public roots (webpki-roots), and an
//! optional file of extra PEM roots. No I/O beyond reading that file.

use rustls_acme::futures_rustls::pki_types::CertificateDer;
use rustls_acme::futures_rustls::pki_types::pem::PemObject;
use rustls_acme::rustls::{ClientConfig, RootCertStore};
use std::sync::Arc;

/// A TLS client configuration (ring) trusting the public roots (webpki-roots) plus the PEM
/// certificates in `root_ca_file` when it is not empty; problems name the config `key`.
pub fn client_config(key: &str, root_ca_file: &str) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !root_ca_file.is_empty() {
        let pem = std::fs::read(root_ca_file)
            .map_err(|e| format!("{key}: cannot read {root_ca_file}: {e}"))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            cert.map_err(|e| e.to_string())
                .and_then(|cert| roots.add(cert).map_err(|e| e.to_string()))
                .map_err(|e| {
                    format!("{key}: {root_ca_file} holds no usable PEM certificate: {e}")
                })?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "{key}: {root_ca_file} holds no usable PEM certificate"
            ));
        }
    }
    let provider = Arc::new(rustls_acme::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("{key}: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
