//! A throwaway PKI for TLS tests: a CA and certificates it signs, as PEM files in a
//! temporary directory (`<name>.pem`, `<name>-key.pem`, `ca.pem`), and TLS clients of the
//! Observer API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use lumen_proto::observer::observer_client::ObserverClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A CA, and a certificate signed by it for each of `names` (its only subject name).
    pub fn new(names: &[&str]) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let pki = Pki { dir, ca };
        for name in names {
            pki.issue(name, &[name]);
        }
        pki
    }

    /// A certificate for the subject names `sans` (DNS names or IP addresses), in
    /// `<name>.pem` and `<name>-key.pem`.
    pub fn issue(&self, name: &str, sans: &[&str]) {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}-key.pem")), key.serialize_pem()).unwrap();
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.path().join(f)
    }

    /// The certificate and key files of `name`, as strings for command lines.
    pub fn cert_key(&self, name: &str) -> (String, String) {
        (
            self.path(&format!("{name}.pem")).display().to_string(),
            self.path(&format!("{name}-key.pem")).display().to_string(),
        )
    }

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.path(f)).unwrap()
    }

    pub fn identity(&self, name: &str) -> Identity {
        Identity::from_pem(
            self.read(&format!("{name}.pem")),
            self.read(&format!("{name}-key.pem")),
        )
    }

    pub fn ca(&self) -> Certificate {
        Certificate::from_pem(self.read("ca.pem"))
    }

    /// Server TLS as `name`, requiring client certificates from this CA.
    pub fn mtls_server(&self, name: &str) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(self.identity(name))
            .client_ca_root(self.ca())
    }

    /// An Observer client of `addr` over TLS, verifying the server as `server_name`, with
    /// the certificate of `identity` if given. Errors as text (the handshake's reason).
    pub async fn client(
        &self,
        addr: &str,
        server_name: &str,
        identity: Option<&str>,
    ) -> Result<ObserverClient<Channel>, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .domain_name(server_name);
        if let Some(id) = identity {
            tls = tls.identity(self.identity(id));
        }
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        Ok(ObserverClient::new(ch))
    }
}
