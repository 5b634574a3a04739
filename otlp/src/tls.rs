//! rustls client configuration for `https://` collectors: a CA file or the
//! system trust store, or (labs only) no certificate check at all.

use std::sync::Arc;

use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
};

use crate::config::{ConfigError, TlsConfig};

/// Builds the client config; `alpn` is `h2` for gRPC, `http/1.1` for HTTP.
pub(crate) fn client_config(
    cfg: &TlsConfig,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, ConfigError> {
    let provider = Arc::new(crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::SystemRoots {
            reason: format!("TLS setup failed: {e}"),
        })?;
    let mut config = if cfg.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match &cfg.ca_file {
            Some(path) => {
                let bad = |reason: String| ConfigError::CaFile {
                    path: path.clone(),
                    reason,
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| bad(format!("cannot read it ({e})")))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(format!("not valid PEM ({e})")))?;
                if certs.is_empty() {
                    return Err(bad("no CERTIFICATE block in it".to_string()));
                }
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| bad(format!("unusable certificate ({e})")))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(ConfigError::SystemRoots {
                        reason: found
                            .errors
                            .first()
                            .map_or("the trust store is empty".to_string(), ToString::to_string),
                    });
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The server name to present and check, from the endpoint host.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name ({e})"))
}

/// Accepts any certificate but still checks the handshake signatures, so the
/// session is at least bound to the key the server presented.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").expect("write");
        let cfg = TlsConfig {
            ca_file: Some(path.clone()),
            insecure_skip_verify: false,
        };
        let e = client_config(&cfg, b"h2")
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("no CERTIFICATE"),
            "{e}"
        );
        let missing = TlsConfig {
            ca_file: Some(dir.path().join("missing.pem")),
            insecure_skip_verify: false,
        };
        let e = client_config(&missing, b"h2")
            .expect_err("rejected")
            .to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot read"),
            "{e}"
        );
    }

    #[test]
    fn insecure_needs_no_roots() {
        let cfg = TlsConfig {
            ca_file: None,
            insecure_skip_verify: true,
        };
        let c = client_config(&cfg, b"http/1.1").expect("builds");
        assert_eq!(c.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(server_name("::1").is_ok());
        assert!(server_name("collector.example").is_ok());
    }
}
