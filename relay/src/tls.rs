//! TLS and mutual TLS (rustls, through tonic) for relay ↔ nodes and clients ↔ relay.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{NodeTlsConfig, ServerTlsConfig as ServerTlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })?;
    if !String::from_utf8_lossy(&bytes).contains("-----BEGIN") {
        return Err(TlsError::Invalid(format!(
            "{what} {}: not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Loaded client-side TLS material towards the nodes.
#[derive(Debug, Clone)]
pub struct NodeTls {
    ca: Certificate,
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl NodeTls {
    pub fn load(cfg: &NodeTlsConfig) -> Result<Self, TlsError> {
        let ca_path = cfg
            .ca_file
            .as_deref()
            .ok_or_else(|| TlsError::Invalid("node_tls.ca_file is required".to_owned()))?;
        let ca = Certificate::from_pem(read("node_tls.ca_file", ca_path)?);
        let identity = match (&cfg.cert_file, &cfg.key_file) {
            (Some(c), Some(k)) => Some(Identity::from_pem(
                read("node_tls.cert_file", c)?,
                read("node_tls.key_file", k)?,
            )),
            (None, None) => None,
            _ => {
                return Err(TlsError::Invalid(
                    "node_tls: cert_file and key_file go together".to_owned(),
                ))
            }
        };
        Ok(Self {
            ca,
            identity,
            server_name: cfg.server_name.clone(),
        })
    }

    /// The name a node's certificate must carry: the configured override, else the name
    /// discovery announced, else the host part of its address.
    pub fn server_name(&self, announced: Option<&str>, address: &str) -> String {
        self.server_name
            .clone()
            .or_else(|| announced.map(str::to_owned))
            .unwrap_or_else(|| host_of(address).to_owned())
    }

    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name(server_name.to_owned());
        if let Some(id) = &self.identity {
            c = c.identity(id.clone());
        }
        c
    }
}

/// `host` of `host:port` / `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    address.rsplit_once(':').map_or(address, |(h, _)| h)
}

/// Server-side TLS of the relay's API; with `client_ca_file`, clients must present a
/// certificate it signed.
pub fn server_config(cfg: &ServerTlsSettings) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(
        read("server_tls.cert_file", &cfg.cert_file)?,
        read("server_tls.key_file", &cfg.key_file)?,
    );
    let mut c = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &cfg.client_ca_file {
        c = c.client_ca_root(Certificate::from_pem(read(
            "server_tls.client_ca_file",
            ca,
        )?));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_split_from_the_port() {
        assert_eq!(host_of("node-1.lab:4244"), "node-1.lab");
        assert_eq!(host_of("[fd00::1]:4244"), "fd00::1");
        assert_eq!(host_of("10.0.0.1:1"), "10.0.0.1");
    }

    #[test]
    fn missing_or_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("ca.pem");
        std::fs::write(&bad, "hello").expect("write");
        let e = NodeTls::load(&NodeTlsConfig {
            ca_file: Some(bad.clone()),
            ..Default::default()
        })
        .expect_err("not PEM");
        assert!(e.to_string().contains("ca.pem"), "{e}");
        let e = NodeTls::load(&NodeTlsConfig {
            ca_file: Some(dir.path().join("missing.pem")),
            ..Default::default()
        })
        .expect_err("missing");
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
