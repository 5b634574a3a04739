//! Client TLS towards the Observer API: Hubble's `--tls*` flags turned into a rustls
//! client configuration, a connector that runs TLS under tonic, and TLS failures turned
//! into one-line reasons.
//!
//! The CLI runs TLS in its own connector (rustls through tokio-rustls, as tonic does)
//! rather than through tonic's `ClientTlsConfig` so that the same configuration can run
//! [`TlsConnector::diagnose`] when a connection dies without saying why.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{self, CryptoProvider};
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    self, AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use tonic::codegen::Service;
use tonic::transport::Uri;

use crate::args::TlsArgs;

const CA_FLAG: &str = "--tls-ca-cert-files";
const CERT_FLAG: &str = "--tls-client-cert-file";
const KEY_FLAG: &str = "--tls-client-key-file";

/// Bad TLS flags or files, named by flag and path.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {reason}")]
    File {
        flag: &'static str,
        path: String,
        reason: String,
    },
    #[error("--tls-client-cert-file and --tls-client-key-file go together: {missing} is missing")]
    HalfIdentity { missing: &'static str },
    #[error("--tls needs an https:// server or host:port, not {server}")]
    PlainScheme { server: String },
    #[error("TLS server name {name:?} (from {from}): not a DNS name or IP address")]
    ServerName { name: String, from: &'static str },
    #[error("no CA certificates in the system store{detail}; give --tls-ca-cert-files")]
    NoSystemRoots { detail: String },
    #[error("invalid TLS configuration: {reason}")]
    Config { reason: String },
}

/// Whether this run connects with TLS: `--tls`, or an `https://` server. As in Hubble, the
/// other `--tls-*` flags alone do not turn it on, and are not read without it.
pub fn enabled(args: &TlsArgs, server: &str) -> bool {
    args.tls || server.starts_with("https://")
}

/// The host part of `host:port`, `[v6]:port` or `scheme://host:port/…`.
pub fn host_of(server: &str) -> &str {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Loaded TLS settings for one server.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClientTls {
    /// Reads the files the flags name; `None` when TLS is off.
    pub fn load(args: &TlsArgs, server: &str) -> Result<Option<Self>, TlsError> {
        if !enabled(args, server) {
            return Ok(None);
        }
        if server.starts_with("http://") {
            return Err(TlsError::PlainScheme {
                server: server.to_owned(),
            });
        }
        let (name, from) = match &args.tls_server_name {
            Some(name) => (name.as_str(), "--tls-server-name"),
            None => (host_of(server), "--server"),
        };
        let server_name =
            ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
                name: name.to_owned(),
                from,
            })?;
        let identity = match (&args.tls_client_cert_file, &args.tls_client_key_file) {
            (Some(cert), Some(key)) => {
                Some((cert, certificates(CERT_FLAG, cert)?, key, private_key(key)?))
            }
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::HalfIdentity { missing: KEY_FLAG }),
            (None, Some(_)) => return Err(TlsError::HalfIdentity { missing: CERT_FLAG }),
        };

        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                reason: e.to_string(),
            })?;
        let builder = if args.tls_allow_insecure {
            // Hubble's --tls-allow-insecure: chain and name go unchecked, so CA files have
            // nothing to do and are not read.
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        } else if args.tls_ca_cert_files.is_empty() {
            builder.with_root_certificates(system_roots()?)
        } else {
            let mut roots = RootCertStore::empty();
            for path in &args.tls_ca_cert_files {
                add_ca_file(&mut roots, path)?;
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match identity {
            Some((cert_path, certs, key_path, key)) => {
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    file_error(
                        KEY_FLAG,
                        key_path,
                        format!("not the key of {CERT_FLAG} {}: {e}", cert_path.display()),
                    )
                })?
            }
            None => builder.with_no_client_auth(),
        };
        // gRPC needs HTTP/2; the server picks it through ALPN.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Self {
            config: Arc::new(config),
            server_name,
        }))
    }

    /// A connector for tonic's `Endpoint::connect_with_connector`.
    pub fn connector(&self) -> TlsConnector {
        TlsConnector {
            config: self.config.clone(),
            server_name: self.server_name.clone(),
        }
    }
}

/// The crypto provider: the process default if one is installed, else ring (as tonic).
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(crypto::ring::default_provider()))
}

fn file_error(flag: &'static str, path: &Path, reason: impl Into<String>) -> TlsError {
    TlsError::File {
        flag,
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        let msg = e.to_string();
        let reason = msg
            .split(" (os error")
            .next()
            .unwrap_or(&msg)
            .to_lowercase();
        file_error(flag, path, reason)
    })
}

/// The certificates in a PEM file; an error unless there is at least one.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(KEY_FLAG, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => file_error(KEY_FLAG, path, "no PEM private key in the file"),
        e => file_error(KEY_FLAG, path, format!("not a PEM file: {e}")),
    })
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    for cert in certificates(CA_FLAG, path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(CA_FLAG, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(())
}

/// The system's CA store (`SSL_CERT_FILE` / `SSL_CERT_DIR` override it), as Hubble uses Go's
/// system pool when no CA file is given.
fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let detail = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(TlsError::NoSystemRoots { detail });
    }
    Ok(roots)
}

/// `--tls-allow-insecure`: any certificate chain and any name are accepted, but the server
/// must still prove it holds the key of the certificate it sent (handshake signatures are
/// verified), so the connection is encrypted to whoever sent that certificate.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// The rustls error somewhere in `e`'s chain. `io::Error::source()` skips the error it
/// wraps, so each `io::Error` is opened with `get_ref()`.
fn find_rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = err
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            .and_then(|inner| find_rustls_error(inner))
        {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// A TLS failure in `e`'s chain as one line: rustls's own words (e.g. "invalid peer
/// certificate: UnknownIssuer") and what to check for the usual causes.
pub fn handshake_reason(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::Error as E;
    let err = find_rustls_error(e)?;
    let hint = match err {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => {
            " (the server's certificate is not signed by a CA in --tls-ca-cert-files or the system store)"
        }
        E::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => " (see --tls-server-name)",
        E::AlertReceived(AlertDescription::CertificateRequired) => {
            " (the server requires a client certificate: see --tls-client-cert-file)"
        }
        E::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => " (the server does not accept the client certificate)",
        E::InvalidMessage(_) => " (does the server speak TLS?)",
        _ => "",
    };
    Some(format!("TLS handshake failed: {err}{hint}"))
}

/// Connects TCP, then TLS with ALPN h2, for tonic's `connect_with_connector`.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    async fn handshake(&self, uri: &Uri) -> io::Result<TlsStream<TcpStream>> {
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?;
        let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(443))).await?;
        tcp.set_nodelay(true)?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// Why the server dropped a connection, if it was TLS: a new handshake that sends
    /// nothing after it and waits up to `wait` for the server's first words.
    ///
    /// In TLS 1.3 the server checks the client's certificate after the client's side of
    /// the handshake is done. When it refuses it, its alert races the client's first
    /// request: the server closes with that request unread, TCP resets the connection and
    /// the alert is usually lost, so the call only says "operation was canceled". A client
    /// that sends nothing gets the alert (or, from a server that accepts it, HTTP/2
    /// settings: no TLS reason).
    pub async fn diagnose(&self, uri: &Uri, wait: Duration) -> Option<String> {
        let attempt = async {
            let mut stream = match self.handshake(uri).await {
                Ok(s) => s,
                Err(e) => return handshake_reason(&e),
            };
            let mut first = [0u8; 512];
            match stream.read(&mut first).await {
                Err(e) => handshake_reason(&e),
                Ok(_) => None,
            }
        };
        tokio::time::timeout(wait, attempt).await.ok().flatten()
    }
}

impl Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let stream = this.handshake(&uri).await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(io::Error::other(
                    "the server did not agree to HTTP/2 over TLS (ALPN h2)",
                ));
            }
            Ok(TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_split_from_port_and_scheme() {
        assert_eq!(host_of("relay.lab:4245"), "relay.lab");
        assert_eq!(host_of("https://relay.lab:443"), "relay.lab");
        assert_eq!(host_of("https://relay.lab"), "relay.lab");
        assert_eq!(host_of("[fd00::1]:4245"), "fd00::1");
        assert_eq!(host_of("10.0.0.1:4245"), "10.0.0.1");
    }

    #[test]
    fn tls_is_on_with_the_flag_or_an_https_server() {
        let on = TlsArgs {
            tls: true,
            ..Default::default()
        };
        assert!(enabled(&on, "relay:4245"));
        assert!(enabled(&TlsArgs::default(), "https://relay:4245"));
        // Other TLS flags alone do not turn it on, as in Hubble.
        let ca_only = TlsArgs {
            tls_ca_cert_files: vec!["ca.pem".into()],
            ..Default::default()
        };
        assert!(!enabled(&ca_only, "relay:4245"));
        assert!(ClientTls::load(&ca_only, "relay:4245")
            .expect("off")
            .is_none());
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let reason = handshake_reason(&e).expect("a TLS reason");
        assert!(
            reason.starts_with("TLS handshake failed: invalid peer certificate: UnknownIssuer"),
            "{reason}"
        );
        assert!(handshake_reason(&io::Error::other("plain")).is_none());
    }
}
