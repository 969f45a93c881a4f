//! The switch: ingress handler, shards, routing and forwarding, and the running server.
//!
//! Per request, on the ingress task of its stream: decode → validate → the card's shard
//! (a bounded queue; full → 91 at once), which answers retransmissions from its duplicate
//! window and otherwise decides and picks the route (`crate::shard`) → the request's
//! `Lifecycle` (`crate::lifecycle`), whose steps this module carries out: journal the
//! request and where it goes (durable before it is sent) → the route's first healthy
//! acquirer → journal the response (durable before it is sent) → response (MTI + 10,
//! echoed fields, 39, 38, 48). An acquirer that does not answer in time gets a reversal
//! (`crate::reversal`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use payswitch_net::serve::{self, Limits, ServeStats};
use payswitch_net::tls::{self, ClientAuth};
use payswitch_net::{quic, ClientTrust, TlsIdentity};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::acquirer::AcquirerLink;
use crate::config::{Config, TlsConfig};
use crate::ops::tls_reload::TlsReload;
mod cluster;
mod driver;

use crate::journal::{Journal, PanKey};
use crate::ops::metrics::Metrics;
use crate::ops::stats::SwitchStats;
use crate::reversal::StoreAndForward;
use crate::scoring::rules::RuleSet;
use crate::scoring::Scoring;
use crate::shard::duplicates::{DupKey, DuplicateWindow, Original};
use crate::shard::{shard_of, RecoveredEntries, Shard, ShardJob, ShardStats};
pub use driver::Switch;
use payswitch_models::model::Model;

/// A running switch: its addresses and a way to stop it.
#[derive(Debug)]
pub struct RunningSwitch {
    /// QUIC listener address, when configured.
    pub quic_addr: Option<SocketAddr>,
    /// TCP listener address, when configured.
    pub tcp_addr: Option<SocketAddr>,
    /// Admin HTTP address, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// The certificate gateways must trust.
    pub certificate: CertificateDer<'static>,
    /// The handler, for its counters.
    pub switch: Arc<Switch>,
    /// Listener counters (QUIC and TCP together).
    pub serve_stats: Arc<ServeStats>,
    shutdown: CancellationToken,
    /// Stops the acquirer links: only after the listeners have drained, so requests in
    /// progress still reach their acquirer and get its answer.
    links_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningSwitch {
    /// Graceful shutdown: stops accepting connections and reading requests, answers the
    /// requests already read (waiting up to `payswitch_net::serve::DRAIN_TIMEOUT`), then
    /// closes the listeners and the acquirer links.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        self.links_shutdown.cancel();
    }

    /// A token that stops the switch when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// The switch's TLS identity and how it trusts acquirers.
#[derive(Debug, Clone)]
pub struct Security {
    /// Certificate and key gateways see.
    pub identity: TlsIdentity,
    /// Trust for each acquirer, in configuration order.
    pub acquirer_trust: Vec<ClientTrust>,
    /// Which gateways may connect, when client certificates are required.
    pub gateways: Option<ClientAuth>,
}

impl Security {
    /// From the configuration's files; a self-signed identity when none is configured.
    pub fn from_config(config: &Config) -> anyhow::Result<Security> {
        let identity = match &config.tls {
            Some(tls) => TlsIdentity::from_pem_files(&tls.cert, &tls.key)?,
            None => {
                tracing::warn!("no certificate configured: using a self-signed one, gateways must be told to trust it");
                TlsIdentity::self_signed(&["localhost", "127.0.0.1"])?
            }
        };
        let gateways = match &config.tls {
            Some(TlsConfig {
                client_ca: Some(ca),
                allowed_clients,
                ..
            }) => Some(
                ClientAuth::from_pem_file(ca, allowed_clients.clone())
                    .with_context(|| format!("reading the gateways' CA {}", ca.display()))?,
            ),
            _ => {
                tracing::warn!("no client CA configured (tls.client_ca): any gateway that reaches the listeners may send authorizations, and TCP is plaintext");
                None
            }
        };
        config.check_acquirer_trust()?;
        let mut acquirer_trust = Vec::with_capacity(config.acquirers.len());
        for acquirer in &config.acquirers {
            let trust = match &acquirer.ca {
                Some(ca) => ClientTrust::from_ca_file(ca)?,
                None if config.insecure_acquirers => {
                    tracing::warn!(acquirer = %acquirer.name, "acquirer certificate NOT verified (quick-start default); pass --acquirer-ca to verify it");
                    ClientTrust::AcceptAny
                }
                None => anyhow::bail!("acquirer {:?}: no CA configured", acquirer.name),
            };
            acquirer_trust.push(trust);
        }
        Ok(Security {
            identity,
            acquirer_trust,
            gateways,
        })
    }
}

/// Loads the configured models and rules; any that fails to load or to fit the budget
/// stops the start with its reason. Watches the rules file and the models directory.
fn start_scoring(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Arc<Scoring>> {
    let s = &config.scoring;
    let rules = Arc::new(
        RuleSet::load(s.rules.as_deref(), crate::scoring::rule_variables())
            .context("loading the rules file")?,
    );
    tokio::spawn(Arc::clone(&rules).watch(shutdown.clone()));
    let budget = std::time::Duration::from_micros(s.budget_us);
    let scoring = Scoring::new(rules, budget, s.event_time, s.max_entities);
    if let Some(path) = &s.model {
        let model =
            Model::load_file(path).with_context(|| format!("loading model {}", path.display()))?;
        scoring
            .set_champion(Arc::new(model))
            .map_err(anyhow::Error::msg)?;
    }
    for path in &s.challengers {
        let model =
            Model::load_file(path).with_context(|| format!("loading model {}", path.display()))?;
        scoring
            .add_challenger(Arc::new(model))
            .map_err(anyhow::Error::msg)?;
    }
    let scoring = Arc::new(scoring);
    if let Some(dir) = &config.scoring.models_dir {
        tokio::spawn(crate::scoring::watch_models_dir(
            Arc::clone(&scoring),
            dir.clone(),
            shutdown,
        ));
    }
    Ok(scoring)
}

/// Starts the switch: acquirer links, shards, listeners and admin HTTP.
pub async fn start(config: &Config, security: Security) -> anyhow::Result<RunningSwitch> {
    config.check()?;
    let shutdown = CancellationToken::new();
    let links_shutdown = CancellationToken::new();
    let stans = match &config.cluster {
        Some(cluster) => crate::acquirer::StanSpace::block(cluster.stan_block),
        None => crate::acquirer::StanSpace::WHOLE,
    };
    let links = config
        .acquirers
        .iter()
        .zip(security.acquirer_trust.iter().cloned())
        .map(|(acquirer, trust)| {
            AcquirerLink::start(acquirer.clone(), stans, trust, links_shutdown.clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = Arc::new(crate::routing::AcquirerWeights::new(links.len()));
    for (index, link) in links.iter().enumerate() {
        link.weigh_into(Arc::clone(&weights), index);
    }
    let table = Arc::new(ArcSwap::from_pointee(config.router()?));
    let scoring = start_scoring(config, links_shutdown.clone())?;
    let metrics = Arc::new(Metrics::new(links.len(), config.pipeline.metrics));
    tokio::spawn(Arc::clone(&metrics).run(links_shutdown.clone()));
    let joined = match &config.cluster {
        Some(cluster) => Some((cluster, crate::cluster::join(cluster).await?)),
        None => None,
    };
    let replica = joined.as_ref().map(|(_, j)| j.replica.clone());
    let (journal, pan_key, mut recovery) = open_journal(config, &scoring, replica)?;
    if let Some((cluster, joined)) = &joined {
        crate::cluster::agree_on_pan_key(&joined.context, cluster, &pan_key).await?;
    }
    let fence = joined.as_ref().map(|(_, j)| Arc::clone(&j.fence));
    let cluster_stats = Arc::new(crate::cluster::ClusterStats::default());
    let cluster_view = joined
        .as_ref()
        .map(|(cluster, j)| crate::cluster::ClusterView {
            node: cluster.node.clone(),
            stats: Arc::clone(&cluster_stats),
            fence: Arc::clone(&j.fence),
            leases: j.lease.bucket().clone(),
            context: j.context.clone(),
            stream: cluster.stream.clone(),
            lease: std::time::Duration::from_millis(cluster.lease_ms),
        });
    let claims = match &joined {
        Some((cluster, joined)) => Some(
            crate::cluster::claims::Claims::open(
                &joined.context,
                cluster,
                std::time::Duration::from_secs(config.journal.duplicate_window_s),
                joined.lease.bucket().clone(),
                cluster::settled_after(config),
            )
            .await
            .context("the claims bucket")?,
        ),
        None => None,
    };
    let vault = match &config.journal.pan_key_file {
        Some(path) if config.journal.enabled => {
            let vault = crate::journal::PanVault::load(path)
                .with_context(|| format!("reading the PAN key file {}", path.display()))?;
            tracing::info!(file = %path.display(), key = vault.active_key(), "PANs sealed in the journal: reversals and advices carry field 2");
            Some(Arc::new(vault))
        }
        _ => None,
    };
    let reversals = StoreAndForward::new(
        links.clone(),
        journal.clone(),
        vault.clone(),
        links_shutdown.clone(),
    );
    if let Some(fence) = &fence {
        reversals.set_fence(Arc::clone(fence));
    }
    let recent = std::mem::take(&mut recovery.recent);
    // The last requests before this start, to settle their claims with (in a cluster).
    let recent_claims: Vec<_> = match &joined {
        Some(_) => {
            let newest = recent.iter().map(|(_, _, at, _)| *at).max().unwrap_or(0);
            recent
                .iter()
                .filter(|(_, _, at, _)| *at >= newest - cluster::SETTLE_TAIL_MS)
                .map(|(hash, key, at, original)| (*hash, *key, *at, Arc::clone(original)))
                .collect()
        }
        None => Vec::new(),
    };
    let velocity = recovery.velocity.take().map(|v| v.into_shards());
    let (shards, shard_stats, observers) =
        start_shards(config, &table, &scoring, recent, velocity, &weights);
    match &joined {
        Some((_, joined)) => {
            cluster::settle_previous(
                journal.as_ref(),
                &reversals,
                recovery,
                &recent_claims,
                claims.as_ref(),
                &joined.previous,
                joined.fence.token(),
            )
            .await?
        }
        None => deliver_what_is_owed(journal.as_ref(), &reversals, recovery).await?,
    }
    if config.journal.enabled && config.journal.retention_days > 0 {
        tokio::spawn(keep_retention(
            config.journal.dir.clone(),
            config.journal.retention_days,
            Arc::clone(&reversals),
            shutdown.child_token(),
        ));
    }
    let acquirer_names = links.iter().map(|l| l.name().to_string()).collect();
    let switch = Arc::new(Switch {
        shards,
        scoring,
        links,
        acquirer_names,
        journal,
        pan_key,
        vault,
        reversals,
        metrics,
        router: Arc::clone(&table),
        stats: Arc::new(SwitchStats::default()),
        shard_stats,
        fence,
        cluster: cluster_stats,
        cluster_view,
        observers,
        outcomes: claims
            .as_ref()
            .map(|_| Arc::new(crate::cluster::follow::Outcomes::default())),
        claims,
    });
    if let Some((cluster, joined)) = joined {
        // The cluster's models, rules and routes are put in force before the listeners
        // open; from then on deployments go both ways.
        let deployer = crate::cluster::deploy::Deployer::open(
            &joined.context,
            cluster,
            Arc::clone(&switch.scoring),
            Arc::clone(&switch.router),
            switch.acquirer_names.clone(),
        )
        .await?;
        deployer
            .start()
            .await
            .context("putting the cluster's deployments in force")?;
        tokio::spawn(Arc::new(deployer).run(links_shutdown.clone()));
        cluster::start(&switch, cluster.clone(), joined, links_shutdown.clone());
    }
    let sources = sources(&switch);
    tokio::spawn(crate::ops::stats::tick(
        sources.clone(),
        links_shutdown.clone(),
    ));
    let serve_stats = Arc::new(ServeStats::default());
    let certificate = security.identity.certs[0].clone();
    let mut listening = listen(config, &security, &switch, &serve_stats, &shutdown).await?;
    let tls_reload = Arc::new(std::mem::take(&mut listening.reload));
    let mut tasks = listening.tasks;
    let mut admin_addr = None;
    if let Some(addr) = config.listen.admin {
        let ready = crate::ops::admin::Readiness {
            model_required: config.scoring.model.is_some(),
            config_source: config.source.clone(),
            serve_stats: Arc::clone(&serve_stats),
            tls: Arc::clone(&tls_reload),
            audit: if config.journal.enabled {
                Some(crate::ops::admin::AuditLog::open(&config.journal.dir)?)
            } else {
                None
            },
        };
        let token = config.admin_token.clone();
        let (bound, task) =
            crate::ops::admin::start(addr, sources, token, ready, shutdown.child_token()).await?;
        admin_addr = Some(bound);
        tasks.push(task);
    }
    Ok(RunningSwitch {
        quic_addr: listening.quic,
        tcp_addr: listening.tcp,
        admin_addr,
        certificate,
        switch,
        serve_stats,
        shutdown,
        links_shutdown,
        tasks,
    })
}

/// Each shard's queue, counters, and queue of other nodes' transactions.
type StartedShards = (
    Vec<mpsc::Sender<ShardJob>>,
    Vec<Arc<ShardStats>>,
    Vec<mpsc::Sender<payswitch_models::features::Transaction>>,
);

/// Starts one task per shard behind its bounded queue, each with its share of the
/// requests the journal remembers in its duplicate window.
fn start_shards(
    config: &Config,
    table: &Arc<ArcSwap<crate::routing::Router>>,
    scoring: &Arc<Scoring>,
    recent: Vec<(u128, DupKey, i64, Arc<Original>)>,
    velocity: Option<Vec<crate::scoring::ShardScoring>>,
    weights: &Arc<crate::routing::AcquirerWeights>,
) -> StartedShards {
    let shard_count = config.pipeline.shard_count();
    let mut observers = Vec::with_capacity(shard_count);
    // The velocity state rebuilt from the journal, one per shard (same count and bound).
    let mut velocity = velocity
        .filter(|v| v.len() == shard_count)
        .map(Vec::into_iter);
    let mut recovered: Vec<RecoveredEntries> = (0..shard_count).map(|_| Vec::new()).collect();
    for (pan_hash, key, at_ms, original) in recent {
        recovered[shard_of(pan_hash, shard_count)].push((key, at_ms, original));
    }
    // `config.check()` keeps both at one per shard or more; the shard asserts it.
    let cards_per_shard = config.scoring.max_cards / shard_count;
    let window = Duration::from_secs(config.journal.duplicate_window_s);
    let window_capacity = config.journal.max_duplicates / shard_count;
    let mut shards = Vec::with_capacity(shard_count);
    let mut shard_stats = Vec::with_capacity(shard_count);
    for entries in recovered {
        let (tx, rx) = mpsc::channel(config.pipeline.shard_queue_depth);
        let (observe, observed) = mpsc::channel(crate::shard::OBSERVED_QUEUE);
        observers.push(observe);
        let stats = Arc::new(ShardStats::default());
        let mut duplicates = DuplicateWindow::new(window, window_capacity);
        for (key, at_ms, original) in entries {
            duplicates.insert(key, at_ms, original);
        }
        let shard_scoring = velocity
            .as_mut()
            .and_then(Iterator::next)
            .unwrap_or_else(|| crate::scoring::ShardScoring::new(cards_per_shard));
        tokio::spawn(crate::shard::run(
            rx,
            observed,
            Arc::clone(table),
            Arc::clone(scoring),
            Shard::with_scoring(
                shard_scoring,
                duplicates,
                Arc::clone(&stats),
                Arc::clone(weights),
            ),
        ));
        shards.push(tx);
        shard_stats.push(stats);
    }
    (shards, shard_stats, observers)
}

/// What the journal says is owed: in-doubt authorizations are queued for reversal
/// (durably, before delivery starts), then everything owed is delivered.
pub(crate) async fn deliver_what_is_owed(
    journal: Option<&Journal>,
    reversals: &Arc<StoreAndForward>,
    recovery: crate::recovery::Recovery,
) -> anyhow::Result<()> {
    let queued = recovery.in_doubt_records(crate::clock::now().unix_ms());
    if let (Some(journal), false) = (journal, queued.is_empty()) {
        journal
            .append(&queued)
            .await
            .context("journaling the reversals of in-doubt authorizations")?;
    }
    for &request_seq in &recovery.unknown_owed {
        reversals.hold(request_seq);
    }
    for (acquirer, link) in reversals.links().iter().enumerate() {
        if let Some(stan) = recovery.highest_wanted_stan(acquirer) {
            link.allocate_after(stan);
        }
    }
    for pending in recovery.pending.into_iter().chain(recovery.in_doubt) {
        reversals.push(pending);
    }
    Ok(())
}

/// Deletes expired journal segments now and every `retention::CHECK_EVERY`
/// (`journal.retention_days`; see `journal::retention`).
async fn keep_retention(
    dir: std::path::PathBuf,
    retention_days: u64,
    reversals: Arc<StoreAndForward>,
    shutdown: CancellationToken,
) {
    use crate::journal::retention;
    let retention = std::time::Duration::from_secs(retention_days.saturating_mul(86_400));
    loop {
        let keep_from = reversals.oldest_owed();
        let swept = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                retention::apply(&dir, retention, std::time::SystemTime::now(), keep_from)
            })
            .await
        };
        match swept {
            Ok(Ok((deleted, bytes))) if !deleted.is_empty() => {
                tracing::info!(
                    segments = deleted.len(),
                    bytes,
                    retention_days,
                    "journal: expired segments deleted"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "journal retention: cannot delete expired segments")
            }
            Err(e) => tracing::error!(error = %e, "journal retention task failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retention::CHECK_EVERY) => {}
        }
    }
}

/// The gateway listeners that are up, and their tasks.
struct Listening {
    quic: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// What a certificate reload swaps.
    reload: TlsReload,
}

/// Binds the configured QUIC and TCP listeners and serves `switch` on them.
async fn listen(
    config: &Config,
    security: &Security,
    switch: &Arc<Switch>,
    serve_stats: &Arc<ServeStats>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Listening> {
    let limits = Limits {
        max_frame: config.pipeline.max_frame,
        max_in_flight_per_stream: config.pipeline.max_in_flight_per_stream,
        max_in_flight_per_connection: config.pipeline.max_in_flight_per_connection,
        max_connections: config.pipeline.max_connections,
        max_connections_per_peer: config.pipeline.max_connections_per_peer,
        idle_timeout: std::time::Duration::from_secs(config.pipeline.idle_timeout_s),
        stall_timeout: std::time::Duration::from_secs(config.pipeline.stall_timeout_s),
        max_in_flight_per_gateway: config.pipeline.max_in_flight_per_gateway,
        max_rate_per_gateway: config.pipeline.max_rate_per_gateway,
    };
    let identity = &security.identity;
    let gateways = security.gateways.as_ref();
    let mut listening = Listening {
        quic: None,
        tcp: None,
        tasks: Vec::new(),
        reload: TlsReload {
            files: config.tls.clone(),
            ..TlsReload::default()
        },
    };
    if let Some(addr) = config.listen.quic {
        let endpoint = quic::server_endpoint_with(addr, identity.clone(), gateways)
            .with_context(|| format!("binding QUIC listener {addr}"))?;
        listening.quic = Some(endpoint.local_addr()?);
        listening.reload.quic = Some(endpoint.clone());
        listening.tasks.push(tokio::spawn(serve::serve_quic(
            endpoint,
            Arc::clone(switch),
            limits,
            Arc::clone(serve_stats),
            shutdown.child_token(),
        )));
    }
    if let Some(addr) = config.listen.tcp {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP listener {addr}"))?;
        listening.tcp = Some(listener.local_addr()?);
        // With client certificates required, TCP is TLS with the same check; without,
        // plain (the warning at start says so).
        let tls = gateways
            .map(|clients| {
                tls::server_config(identity.clone(), Some(clients))
                    .map(|c| Arc::new(std::sync::RwLock::new(Arc::new(c))))
            })
            .transpose()
            .context("TLS for the TCP listener")?;
        listening.reload.tcp = tls.clone();
        listening.tasks.push(tokio::spawn(serve::serve_tcp_with(
            listener,
            tls,
            Arc::clone(switch),
            limits,
            Arc::clone(serve_stats),
            shutdown.child_token(),
        )));
    }
    Ok(listening)
}

/// What the journal left: the writer, the PAN hash key, and what is owed and remembered.
fn open_journal(
    config: &Config,
    scoring: &Arc<Scoring>,
    replica: Option<crate::journal::replica::Replica>,
) -> anyhow::Result<(Option<Journal>, PanKey, crate::recovery::Recovery)> {
    let journal_config = &config.journal;
    if !journal_config.enabled {
        tracing::warn!("journal turned off: answered authorizations do not survive a crash and in-doubt ones are never reversed");
        let key: [u8; 16] = rand::random();
        return Ok((None, PanKey::from_bytes(key), Default::default()));
    }
    let dir = &journal_config.dir;
    crate::journal::private_dir(dir)
        .with_context(|| format!("creating the journal directory {}", dir.display()))?;
    let pan_key = match &journal_config.pan_hash_key_file {
        Some(file) => PanKey::load(file)
            .with_context(|| format!("reading the PAN hash key {}", file.display()))?,
        None => PanKey::load_or_create(dir).context("reading the PAN hash key")?,
    };
    let acquirers: Vec<String> = config.acquirers.iter().map(|a| a.name.clone()).collect();
    let window_ms =
        i64::try_from(journal_config.duplicate_window_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let now_ms = crate::clock::now().unix_ms();
    let shard_count = config.pipeline.shard_count();
    let velocity = crate::recovery::VelocityReplay::new(
        Arc::clone(scoring),
        shard_count,
        config.scoring.max_cards / shard_count,
        now_ms.saturating_sub(crate::recovery::VELOCITY_REPLAY_MS),
    );
    let recovery = crate::recovery::recover(
        dir,
        &acquirers,
        now_ms.saturating_sub(window_ms),
        journal_config.max_duplicates,
        Some(velocity),
    )
    .with_context(|| format!("replaying the journal in {}", dir.display()))?;
    let report = &recovery.report;
    if let Some(torn) = &report.torn_tail {
        tracing::warn!(segment = %torn.path.display(), offset = torn.offset, bytes = torn.bytes, "journal: torn final record (a crash mid-write) cut off");
    }
    if recovery.unknown_acquirers > 0 {
        tracing::error!(
            count = recovery.unknown_acquirers,
            "journal: reversals owed to acquirers no longer configured are left undelivered"
        );
    }
    tracing::info!(
        dir = %dir.display(),
        records = report.records,
        in_doubt = recovery.in_doubt.len(),
        reversals_pending = recovery.pending.len(),
        remembered = recovery.recent.len(),
        beyond_max_duplicates = recovery.dropped_over_capacity,
        velocity_replayed = recovery.velocity.as_ref().map_or(0, |v| v.fed),
        remembered = recovery.recent.len(),
        "journal replayed"
    );
    let journal = Journal::start_replicated(journal_config, report.next_seq(), replica)
        .with_context(|| format!("opening the journal in {}", dir.display()))?;
    Ok((Some(journal), pan_key, recovery))
}

/// What operators read and act on, from the running switch's parts.
fn sources(switch: &Arc<Switch>) -> crate::ops::Sources {
    let shards = switch.shards.clone();
    crate::ops::Sources {
        scoring: Arc::clone(&switch.scoring),
        links: switch.links.clone(),
        journal: switch.journal.clone(),
        reversals: Arc::clone(&switch.reversals),
        metrics: Arc::clone(&switch.metrics),
        router: Arc::clone(&switch.router),
        counters: Arc::clone(&switch.stats),
        shard_stats: switch.shard_stats.clone(),
        cluster: switch.cluster_view.clone(),
        queue_depths: Arc::new(move || {
            shards
                .iter()
                .map(|s| s.max_capacity() - s.capacity())
                .collect()
        }),
    }
}
