//! Reloading the gateway listeners' TLS settings from their files without a restart.

use std::sync::Arc;

use payswitch_net::serve;
use payswitch_net::tls::{self, ClientAuth};
use payswitch_net::{quic, TlsIdentity};

use crate::config::TlsConfig;

/// The listeners' TLS settings, to reload the certificate, key, client CA and allowlist
/// from their files without a restart (`POST /api/tls/reload`): new connections get the
/// new ones, connections open keep theirs.
#[derive(Debug, Default)]
pub struct TlsReload {
    /// The files, as configured.
    pub files: Option<TlsConfig>,
    /// The QUIC listener's endpoint.
    pub quic: Option<quinn::Endpoint>,
    /// The TCP listener's TLS settings.
    pub tcp: Option<serve::TlsSource>,
}

impl TlsReload {
    /// Reads the configured files again and swaps them in; what was loaded, or why
    /// nothing was (the old settings stay).
    pub fn reload(&self) -> anyhow::Result<String> {
        let Some(files) = &self.files else {
            anyhow::bail!("no certificate files configured ([tls]): nothing to reload");
        };
        let identity = TlsIdentity::from_pem_files(&files.cert, &files.key)?;
        let gateways = match &files.client_ca {
            Some(ca) => Some(ClientAuth::from_pem_file(
                ca,
                files.allowed_clients.clone(),
            )?),
            None => None,
        };
        if let Some(endpoint) = &self.quic {
            endpoint.set_server_config(Some(quic::server_config_with(
                identity.clone(),
                gateways.as_ref(),
            )?));
        }
        if let Some(tcp) = &self.tcp {
            let config = Arc::new(tls::server_config(identity, gateways.as_ref())?);
            *tcp.write().unwrap_or_else(|e| e.into_inner()) = config;
        }
        let what = match &gateways {
            Some(g) => format!(
                "certificate {} and client CA {} ({} allowed gateway names)",
                files.cert.display(),
                files
                    .client_ca
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
                g.allowed.len()
            ),
            None => format!("certificate {}", files.cert.display()),
        };
        tracing::info!(loaded = %what, "TLS settings reloaded: new connections use them");
        Ok(what)
    }
}
