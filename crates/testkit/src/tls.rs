//! A throwaway certificate authority for TLS tests and the bench: a CA made with rcgen at run
//! time (no key is checked in) that issues server certificates for loopback (`localhost`,
//! `127.0.0.1`) and client certificates, written as PEM files under a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A test CA and the directory its files live in (removed on drop).
pub struct TestCa {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA (`CN=<name>`), its certificate in `ca.pem`.
    pub fn new(name: &str) -> TestCa {
        let dir = tempfile::tempdir().expect("a temp dir for the test CA");
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.pem()).expect("write ca.pem");
        TestCa {
            dir,
            issuer: Issuer::new(params, key),
            ca,
        }
    }

    /// The CA certificate (PEM) clients and the server's `--tls-client-ca` trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate `CN=<cn>` for `localhost` and `127.0.0.1`, as `<file>.pem` and
    /// `<file>.key` (overwritten if present: a rotation).
    pub fn server(&self, file: &str, cn: &str) -> CertFiles {
        self.issue(
            file,
            cn,
            vec!["localhost".into(), "127.0.0.1".into()],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A cluster node's certificate `CN=<cn>` for `localhost` and `127.0.0.1`, good for serving
    /// and for presenting as a client (a follower presents it to the leader under mTLS).
    pub fn node(&self, file: &str, cn: &str) -> CertFiles {
        self.issue(
            file,
            cn,
            vec!["localhost".into(), "127.0.0.1".into()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate `CN=<cn>` with `sans` (DNS names, IPs, or URIs such as SPIFFE IDs:
    /// anything with `://`), as `<file>.pem`
    /// and `<file>.key`.
    pub fn client(&self, file: &str, cn: &str, sans: Vec<String>) -> CertFiles {
        self.issue(file, cn, sans, vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> CertFiles {
        let key = KeyPair::generate().expect("a key");
        let (uris, names): (Vec<String>, Vec<String>) =
            sans.into_iter().partition(|s| s.contains("://"));
        let mut params = CertificateParams::new(names).expect("certificate params");
        for u in uris {
            let uri = rcgen::string::Ia5String::try_from(u).expect("an ASCII URI");
            params.subject_alt_names.push(rcgen::SanType::URI(uri));
        }
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = usages;
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign with the test CA");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        // The key first: a server polling the files sees the pair only once both are new.
        std::fs::write(&files.key, key.serialize_pem()).expect("write the key");
        std::fs::write(&files.cert, cert.pem()).expect("write the certificate");
        files
    }

    /// `serve` flags for TLS with `server`'s files, plus `--tls-client-ca` (this CA) when
    /// `mutual`.
    pub fn serve_args(&self, server: &CertFiles, mutual: bool) -> Vec<String> {
        let mut args = vec![
            "--tls-cert".to_string(),
            server.cert.display().to_string(),
            "--tls-key".to_string(),
            server.key.display().to_string(),
        ];
        if mutual {
            args.push("--tls-client-ca".into());
            args.push(self.ca.display().to_string());
        }
        args
    }
}
