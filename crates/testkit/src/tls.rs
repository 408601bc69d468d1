//! Certificates for TLS tests: a CA made on the spot and a leaf it signed for `127.0.0.1` and
//! `localhost`, written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use crate::temp::temp_dir;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// PEM files for TLS tests: a CA, and a certificate + key it signed that is valid for
/// `127.0.0.1` and `localhost` (servers use it; with client authentication, so do clients).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// The leaf certificate.
    pub cert: PathBuf,
    /// The leaf's private key.
    pub key: PathBuf,
}

/// A fresh CA and leaf in a new directory (removed by the caller's [`TlsDir`]).
pub struct TlsDir {
    /// The CA, certificate and key files.
    pub files: TlsFiles,
    dir: PathBuf,
}

impl Drop for TlsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TlsDir {
    /// Makes the CA and the leaf.
    pub fn new() -> Self {
        let dir = temp_dir("tls");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tokenfan test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let mut leaf_params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tokenfan");
        let leaf = leaf_params.signed_by(&leaf_key, &ca).expect("leaf");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write pem");
            path
        };
        let files = TlsFiles {
            ca: write("ca.pem", ca.pem()),
            cert: write("cert.pem", leaf.pem()),
            key: write("key.pem", leaf_key.serialize_pem()),
        };
        Self { files, dir }
    }

    /// Writes `text` to a file in the directory (a password file, say).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Default for TlsDir {
    fn default() -> Self {
        Self::new()
    }
}
