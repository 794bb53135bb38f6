//! TLS: the rustls server configuration, from configured PEM files or a self-signed certificate
//! generated on first start so that STARTTLS works out of the box.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the generated certificate lives, relative to the data dir.
pub fn generated_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Builds the server TLS configuration (TLS 1.2 and 1.3, ring provider).
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(live_server_config(config)?.0)
}

/// The server TLS configuration and the handle that swaps its certificate (`postern reload`):
/// handshakes after a swap present the new certificate, connections already up keep theirs.
pub fn live_server_config(config: &Config) -> Result<(Arc<ServerConfig>, Arc<LiveCert>), TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = Arc::new(LiveCert(RwLock::new(Arc::new(certified_key(
        config, &provider,
    )?))));
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    Ok((Arc::new(server), cert))
}

/// The certificate every handshake is offered, replaceable while the server runs.
#[derive(Debug)]
pub struct LiveCert(RwLock<Arc<CertifiedKey>>);

impl LiveCert {
    /// Reads the configured certificate and key again and offers them from now on; on any
    /// error the current ones stay. True when the certificate chain changed.
    pub fn reload(&self, config: &Config) -> Result<bool, TlsError> {
        let provider = rustls::crypto::ring::default_provider();
        let key = certified_key(config, &provider)?;
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        let changed = current.cert != key.cert;
        *current = Arc::new(key);
        Ok(changed)
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// The configured PEM certificate chain and key (or the generated self-signed pair), checked
/// to belong together.
fn certified_key(
    config: &Config,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let (cert_path, key_path) = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let (cert, key) = generated_paths(&config.server.data_dir);
            if !cert.exists() || !key.exists() {
                generate_self_signed(&config.server.hostname, &cert, &key)?;
            }
            (cert, key)
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: cert_path,
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let key = CertifiedKey::from_der(certs, key, provider)?;
    Ok(key)
}

fn generate_self_signed(hostname: &str, cert_path: &Path, key_path: &Path) -> Result<(), TlsError> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !names.iter().any(|n| n == hostname) {
        names.insert(0, hostname.to_string());
    }
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let dir = cert_path.parent().expect("cert path has a parent");
    fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    write_private(key_path, generated.key_pair.serialize_pem().as_bytes())?;
    fs::write(cert_path, generated.cert.pem()).map_err(|source| TlsError::Read {
        path: cert_path.to_path_buf(),
        source,
    })?;
    tracing::info!(cert = %cert_path.display(), "generated a self-signed certificate");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = || -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(bytes)
    };
    write().map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_and_loads_self_signed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::embedded_default();
        config.server.data_dir = dir.path().to_path_buf();
        server_config(&config).unwrap();
        let (cert, key) = generated_paths(dir.path());
        assert!(cert.exists() && key.exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Second start reuses the files.
        server_config(&config).unwrap();
    }
}
