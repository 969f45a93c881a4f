//! TLS 1.3 for QUIC and TCP: server identities (from PEM files or self-signed), client
//! trust, and client certificates: gateways authenticated against a CA and, optionally,
//! an allowlist of their names.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

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
    server_crypto_with(identity, None)
}

/// As [`server_crypto`], requiring client certificates as `clients` says when given.
pub fn server_crypto_with(
    identity: TlsIdentity,
    clients: Option<&ClientAuth>,
) -> Result<QuicServerConfig, NetError> {
    let config = server_config(identity, clients)?;
    QuicServerConfig::try_from(config).map_err(|e| NetError::Tls(e.to_string()))
}

/// The rustls server config, TLS 1.3 only, with the wire contract's ALPN. Early data
/// (0-RTT) is never enabled: an authorization replayed by an attacker must not be taken.
pub fn server_config(
    identity: TlsIdentity,
    clients: Option<&ClientAuth>,
) -> Result<rustls::ServerConfig, NetError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => builder.with_client_cert_verifier(clients.verifier()?),
    };
    let mut config = builder
        .with_single_cert(identity.certs, identity.key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// Which gateways may connect: a client certificate issued by one of `roots` and, when
/// `allowed` is not empty, valid for one of its names (a DNS name in the certificate's
/// subject alternative names).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// CA certificates gateway certificates must chain to.
    pub roots: Vec<CertificateDer<'static>>,
    /// Gateway names accepted; empty: any certificate from the CA.
    pub allowed: Vec<String>,
}

impl ClientAuth {
    /// Reads the CA certificates from a PEM file.
    pub fn from_pem_file(ca: &Path, allowed: Vec<String>) -> Result<ClientAuth, NetError> {
        let roots = CertificateDer::pem_file_iter(ca)
            .map_err(|e| NetError::Tls(format!("{}: {e}", ca.display())))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NetError::Tls(format!("{}: {e}", ca.display())))?;
        if roots.is_empty() {
            return Err(NetError::Tls(format!("{}: no certificate", ca.display())));
        }
        for name in &allowed {
            ServerName::try_from(name.as_str())
                .map_err(|_| NetError::Tls(format!("allowed client {name:?} is not a DNS name")))?;
        }
        Ok(ClientAuth { roots, allowed })
    }

    fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, NetError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| NetError::Tls(e.to_string()))?;
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| NetError::Tls(e.to_string()))?;
        Ok(Arc::new(AllowlistVerifier {
            inner,
            allowed: self.allowed.clone(),
        }))
    }

    /// The allowed name `certificate` is valid for (the first), or `None`; with no
    /// allowlist, `Some("")` for any certificate.
    pub fn identity_of(&self, certificate: &CertificateDer<'_>) -> Option<String> {
        if self.allowed.is_empty() {
            return Some(String::new());
        }
        allowed_name(&self.allowed, certificate).map(str::to_string)
    }
}

fn allowed_name<'a>(allowed: &'a [String], certificate: &CertificateDer<'_>) -> Option<&'a str> {
    let cert = webpki::EndEntityCert::try_from(certificate).ok()?;
    allowed.iter().map(String::as_str).find(|name| {
        ServerName::try_from(*name)
            .is_ok_and(|server_name| cert.verify_is_valid_for_subject_name(&server_name).is_ok())
    })
}

/// The CA's check, then the allowlist's.
#[derive(Debug)]
struct AllowlistVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowlistVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.allowed.is_empty() && allowed_name(&self.allowed, end_entity).is_none() {
            return Err(rustls::Error::General(
                "client certificate names no allowed gateway".into(),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The rustls client config for connecting to a QUIC peer speaking the wire contract.
pub fn client_crypto(trust: ClientTrust) -> Result<QuicClientConfig, NetError> {
    client_crypto_with(trust, None)
}

/// As [`client_crypto`], presenting `identity` as the client certificate when given.
pub fn client_crypto_with(
    trust: ClientTrust,
    identity: Option<TlsIdentity>,
) -> Result<QuicClientConfig, NetError> {
    let config = client_config(trust, identity)?;
    QuicClientConfig::try_from(config).map_err(|e| NetError::Tls(e.to_string()))
}

/// The rustls client config (for QUIC or TCP), TLS 1.3 only, with the wire contract's
/// ALPN, presenting `identity` when given.
pub fn client_config(
    trust: ClientTrust,
    identity: Option<TlsIdentity>,
) -> Result<rustls::ClientConfig, NetError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let builder = match trust {
        ClientTrust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots.add(cert).map_err(|e| NetError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(roots)
        }
        ClientTrust::AcceptAny => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert(provider()))),
    };
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => builder
            .with_client_auth_cert(identity.certs, identity.key)
            .map_err(|e| NetError::Tls(e.to_string()))?,
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
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
