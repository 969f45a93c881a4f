//! TLS 1.3 for QUIC: server identities (from PEM files or self-signed) and client trust.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::NetError;

/// ALPN protocol id of the wire contract.
pub const ALPN: &[u8] = b"iso8583";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<TlsIdentity, NetError> {
        let bad = |what: &Path, e: rustls::pki_types::pem::Error| {
            NetError::Tls(format!("{}: {e}", what.display()))
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert, e))?;
        if certs.is_empty() {
            return Err(NetError::Tls(format!("{}: no certificate", cert.display())));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e))?;
        Ok(TlsIdentity { certs, key })
    }

    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: &[&str]) -> Result<TlsIdentity, NetError> {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let certified =
            rcgen::generate_simple_self_signed(names).map_err(|e| NetError::Tls(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
        Ok(TlsIdentity {
            certs: vec![certified.cert.der().clone()],
            key: key.into(),
        })
    }
}

/// How a client decides to trust a server's certificate.
#[derive(Debug, Clone)]
pub enum ClientTrust {
    /// Trust these roots (an acquirer CA file, or a test's self-signed certificate).
    Roots(Vec<CertificateDer<'static>>),
    /// Accept any certificate. Quick-start and load testing only: it gives no protection
    /// against an impostor, and callers print a warning when they use it.
    AcceptAny,
}

impl ClientTrust {
    /// Roots from a PEM file.
    pub fn from_ca_file(path: &Path) -> Result<ClientTrust, NetError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| NetError::Tls(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(NetError::Tls(format!("{}: no certificate", path.display())));
        }
        Ok(ClientTrust::Roots(certs))
    }
}

/// The rustls server config of a QUIC listener: TLS 1.3 only, ALPN `iso8583`.
pub fn server_crypto(identity: TlsIdentity) -> Result<QuicServerConfig, NetError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.certs, identity.key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    QuicServerConfig::try_from(config).map_err(|e| NetError::Tls(e.to_string()))
}

/// The rustls client config for connecting to a QUIC peer speaking the wire contract.
pub fn client_crypto(trust: ClientTrust) -> Result<QuicClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = match trust {
        ClientTrust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| NetError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ClientTrust::AcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider())))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(config).map_err(|e| NetError::Tls(e.to_string()))
}

/// Skips the certificate check but still checks the handshake signature, so the session
/// keys at least belong to whoever holds the presented certificate.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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
