//! `payswitch serve`: the switch from a config file, or from quick-start flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use payswitch::config::{
    AcquirerConfig, Config, ListenConfig, PipelineConfig, ScoringConfig, TlsConfig,
};
use payswitch::journal::JournalConfig;
use payswitch::switch::{self, Security};

use crate::journal::FsyncArg;

/// Arguments of `payswitch serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// TOML configuration file; quick-start flags given as well override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// QUIC (UDP) listen address for gateways [default without a config file:
    /// 127.0.0.1:8583, loopback only].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Plain TCP listen address for legacy gateways.
    #[arg(long)]
    pub tcp_listen: Option<SocketAddr>,
    /// Admin HTTP listen address (`/health`).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Acquirer QUIC address; repeat for several. Every card goes to the first healthy one,
    /// in the order given.
    #[arg(long = "acquirer")]
    pub acquirers: Vec<SocketAddr>,
    /// CA certificate (PEM) to verify quick-start acquirers with. Without it their
    /// certificates are accepted unverified, with a warning.
    #[arg(long)]
    pub acquirer_ca: Option<PathBuf>,
    /// Acquirer timeout for quick-start acquirers, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub acquirer_timeout_ms: u64,
    /// The switch's certificate chain (PEM); self-signed when absent.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The switch's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA certificate (PEM) gateways' client certificates must chain to: with it every
    /// gateway needs one, on QUIC and on TCP (which then speaks TLS).
    #[arg(long, requires = "cert")]
    pub client_ca: Option<PathBuf>,
    /// A gateway name (DNS name in its certificate) allowed to connect; repeat for
    /// several. Without any, every certificate the client CA issued is accepted.
    #[arg(long = "allowed-client", requires = "client_ca")]
    pub allowed_clients: Vec<String>,
    /// Number of shards (default: one per core).
    #[arg(long)]
    pub shards: Option<usize>,
    /// The champion fraud model file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A challenger model file, scored in shadow; repeat for several.
    #[arg(long = "challenger")]
    pub challengers: Vec<PathBuf>,
    /// The rules file (CEL), reloaded when it changes.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// A directory watched for `champion.pswm` / `challenger-*.pswm` to deploy.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// The time velocity windows use [default: transmission]: field 7, when the gateway
    /// sent the request (never taken as more than 5 minutes ahead of the switch's clock;
    /// the clock when field 7 is missing or unparseable), so `load --data` replays a file
    /// on its own timeline as in training. `clock`: the switch's clock, for gateways whose
    /// clocks are not trusted.
    #[arg(long, value_enum)]
    pub event_time: Option<EventTimeArg>,
    /// Journal directory (default `journal` under the working directory).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Run without a journal: nothing answered survives a crash. For tests and benchmarks.
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
    /// When journal records reach the disk: `always` (fdatasync per group commit) or
    /// `never` (survives a crash of the switch, not of the machine).
    #[arg(long, value_enum)]
    pub fsync: Option<FsyncArg>,
    /// Group-commit window, microseconds.
    #[arg(long)]
    pub group_commit_window_us: Option<u64>,
}

/// `--event-time` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum EventTimeArg {
    /// The switch's clock.
    Clock,
    /// Field 7 of the request, held at most 5 minutes ahead of the switch's clock.
    Transmission,
}

impl ServeArgs {
    /// The configuration these arguments describe.
    pub fn to_config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            // Checked once the flags are applied: they may complete the file.
            Some(path) => Config::read_file(path)?,
            None => empty_config(),
        };
        self.override_listen(&mut config);
        if let Some(shards) = self.shards {
            config.pipeline.shards = shards;
        }
        self.override_scoring(&mut config.scoring);
        self.override_journal(&mut config.journal);
        self.add_acquirers(&mut config);
        if let Ok(token) = std::env::var("PAYSWITCH_ADMIN_TOKEN") {
            config.admin_token = Some(token);
        }
        config.check()?;
        Ok(config)
    }

    /// Listeners and the switch's certificate. Without a config file or a listener
    /// given, QUIC on port 8583 of the loopback interface only: a quick start has no
    /// client certificates, so it must not be reachable from other machines unless asked
    /// (`--listen 0.0.0.0:8583`).
    fn override_listen(&self, config: &mut Config) {
        if self.config.is_none() && self.listen.is_none() && self.tcp_listen.is_none() {
            config.listen.quic = Some(SocketAddr::from(([127, 0, 0, 1], 8583)));
        }
        config.listen.quic = self.listen.or(config.listen.quic);
        config.listen.tcp = self.tcp_listen.or(config.listen.tcp);
        config.listen.admin = self.admin.or(config.listen.admin);
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let file = config.tls.take();
            let (client_ca, allowed_clients) = file
                .map(|tls| (tls.client_ca, tls.allowed_clients))
                .unwrap_or_default();
            config.tls = Some(TlsConfig {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone().or(client_ca),
                allowed_clients: if self.allowed_clients.is_empty() {
                    allowed_clients
                } else {
                    self.allowed_clients.clone()
                },
            });
        }
    }

    /// Models, rules and the event time; challengers are added to the file's.
    fn override_scoring(&self, scoring: &mut ScoringConfig) {
        if self.model.is_some() {
            scoring.model = self.model.clone();
        }
        scoring.challengers.extend(self.challengers.iter().cloned());
        if self.rules.is_some() {
            scoring.rules = self.rules.clone();
        }
        if self.models_dir.is_some() {
            scoring.models_dir = self.models_dir.clone();
        }
        if let Some(event_time) = self.event_time {
            scoring.event_time = match event_time {
                EventTimeArg::Clock => payswitch::scoring::EventTime::Clock,
                EventTimeArg::Transmission => payswitch::scoring::EventTime::Transmission,
            };
        }
    }

    fn override_journal(&self, journal: &mut JournalConfig) {
        if let Some(dir) = &self.journal {
            journal.dir = dir.clone();
        }
        if self.no_journal {
            journal.enabled = false;
        }
        if let Some(fsync) = self.fsync {
            journal.fsync = fsync.into();
        }
        if let Some(window) = self.group_commit_window_us {
            journal.group_commit_window_us = window;
        }
    }

    /// The quick-start acquirers, after the file's. Without `--acquirer-ca` their
    /// certificates are accepted unverified.
    fn add_acquirers(&self, config: &mut Config) {
        for (i, address) in self.acquirers.iter().enumerate() {
            config.acquirers.push(AcquirerConfig {
                name: format!("acquirer-{}", i + 1),
                address: *address,
                server_name: "localhost".into(),
                ca: self.acquirer_ca.clone(),
                timeout_ms: self.acquirer_timeout_ms,
                max_in_flight: 4_096,
                breaker: Default::default(),
            });
        }
        if !self.acquirers.is_empty() && self.acquirer_ca.is_none() {
            config.insecure_acquirers = true;
        }
    }
}

/// A configuration with nothing set but the defaults, for the flags to fill in.
fn empty_config() -> Config {
    Config {
        listen: ListenConfig {
            quic: None,
            tcp: None,
            admin: None,
        },
        tls: None,
        pipeline: PipelineConfig::default(),
        scoring: Default::default(),
        journal: Default::default(),
        cluster: None,
        acquirers: Vec::new(),
        routes: Vec::new(),
        insecure_acquirers: false,
        source: None,
        admin_token: None,
    }
}

/// Runs the switch until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    let security = Security::from_config(&config)?;
    let running = switch::start(&config, security).await?;
    if let Some(addr) = running.quic_addr {
        println!("payswitch: QUIC (ALPN iso8583) on {addr}");
    }
    if let Some(addr) = running.tcp_addr {
        println!("payswitch: TCP on {addr}");
    }
    if let Some(addr) = running.admin_addr {
        println!("payswitch: admin on http://{addr}/health");
    }
    for acquirer in &config.acquirers {
        println!(
            "payswitch: acquirer {} at {}",
            acquirer.name, acquirer.address
        );
    }
    shutdown_signal().await?;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C, or on SIGTERM where there is one (what service managers send).
pub async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            ctrl_c = tokio::signal::ctrl_c() => ctrl_c.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn to_config(args: &[&str]) -> anyhow::Result<Config> {
        let command =
            Command::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))?;
        command.serve.to_config()
    }

    #[test]
    fn quick_start_flags_make_a_config_that_checks_out() {
        let config = to_config(&["--acquirer", "127.0.0.1:9001"]).unwrap();
        assert!(config.insecure_acquirers);
        assert_eq!(config.acquirers[0].timeout_ms, 2_000);
        // No client certificates in a quick start: reachable from this machine only.
        assert_eq!(
            config.listen.quic,
            Some(SocketAddr::from(([127, 0, 0, 1], 8583)))
        );
        let every_flag = [
            "--listen=127.0.0.1:8583",
            "--tcp-listen=127.0.0.1:8584",
            "--admin=127.0.0.1:9583",
            "--acquirer=127.0.0.1:9001",
            "--acquirer=127.0.0.1:9002",
            "--acquirer-timeout-ms=60000",
            "--shards=1024",
            "--no-journal",
            "--fsync=never",
            "--group-commit-window-us=100000",
            "--event-time=clock",
        ];
        let config = to_config(&every_flag).unwrap();
        assert_eq!(config.pipeline.shards, 1024);
        assert_eq!(config.acquirers.len(), 2);
    }

    #[test]
    fn quick_start_flags_out_of_range_are_refused_naming_the_key() {
        let err = to_config(&["--acquirer=127.0.0.1:9001", "--acquirer-timeout-ms=0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeout_ms = 0 is out of range"), "{err}");
        let err = to_config(&["--acquirer=127.0.0.1:9001", "--shards=5000"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("pipeline.shards = 5000"), "{err}");
    }
}
