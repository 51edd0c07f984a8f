//! A certificate authority and a server certificate for `127.0.0.1` and `localhost`, made for
//! one test, for servers that talk TLS.

use std::path::{Path, PathBuf};

use super::ServerError;

/// A CA and a server certificate it signed, written as PEM files to a temporary directory that
/// lives as long as this value.
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
    ca_pem: String,
}

impl TestPki {
    /// Generates a new CA and a server certificate for `127.0.0.1` and `localhost`.
    pub fn generate() -> Result<TestPki, ServerError> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let failed = |what: &str, e: rcgen::Error| ServerError::failed(format!("{what}: {e}"));
        let ca_key = KeyPair::generate().map_err(|e| failed("a CA key", e))?;
        let mut ca =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA parameters", e))?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca
            .self_signed(&ca_key)
            .map_err(|e| failed("a CA certificate", e))?;
        let server_key = KeyPair::generate().map_err(|e| failed("a server key", e))?;
        let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(|e| failed("server parameters", e))?
            .signed_by(&server_key, &ca_cert, &ca_key)
            .map_err(|e| failed("a server certificate", e))?;
        let dir = super::process::temp_dir("pki")?;
        let write = |name: &str, pem: &str| {
            std::fs::write(dir.path().join(name), pem)
                .map_err(|e| ServerError::io(format!("write {name}"), e))
        };
        write("ca.pem", &ca_cert.pem())?;
        write("server.pem", &server.pem())?;
        write("server.key", &server_key.serialize_pem())?;
        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            dir,
        })
    }

    /// The CA certificate, PEM: what clients trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate's file (PEM).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    /// The server key's file (PEM).
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    /// The directory that holds the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
