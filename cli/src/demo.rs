//! `payswitch demo`: two simulated acquirers, the switch routing between them by BIN, and an
//! open-loop load through it — all in this process, on loopback ephemeral ports.
//!
//! With `--compare-direct` the same load is first sent straight to one acquirer simulator,
//! so the switch's own cost (one more QUIC hop plus its pipeline) is measured in the same
//! run, on the same machine, under the same noise.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_loadtest::load::{self, LoadConfig, Mode, Report};
use payswitch_net::{ClientTrust, TlsIdentity};
use serde::Serialize;

use std::sync::Arc;

use payswitch_loadtest::workload::{self, GenConfig};
use payswitch_models::model::{Model, ModelKind};
use payswitch_models::train::{self, TrainOptions};

use payswitch::config::{
    AcquirerConfig, Config, ListenConfig, PipelineConfig, RouteConfig, ScoringConfig,
};
use payswitch::journal::JournalConfig;
use payswitch::scoring::EventTime;
use payswitch::switch::{self, RunningSwitch, Security};

use crate::journal::FsyncArg;

/// Arguments of `payswitch demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the load runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Offered load, transactions per second.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Gateway connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Pipeline requests on one long-lived stream per connection instead of one stream
    /// per transaction.
    #[arg(long)]
    pub pipelined: bool,
    /// First send the same load straight to one acquirer simulator, to measure what the
    /// switch adds.
    #[arg(long)]
    pub compare_direct: bool,
    /// Median latency of the simulated acquirers, microseconds (0: answer at once, to
    /// isolate the switch's own cost).
    #[arg(long)]
    pub acquirer_latency_us: Option<u64>,
    /// The champion model; without it the demo trains one at start on a generated
    /// population (seed 1) — the same as `payswitch gen-data --count 100000 --seed 1` then
    /// `payswitch model train --kind forest --trees 50 --depth 8`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Write the report(s) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Journal directory; default: a new directory under the system's temporary directory,
    /// printed at the end (check it with `payswitch journal verify DIR`).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Run the switch without a journal (to measure what the journal costs).
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
    /// First send the same load through a second switch without a journal, to measure
    /// what the journal costs in the same run.
    #[arg(long, conflicts_with = "no_journal")]
    pub compare_no_journal: bool,
    /// First send the same load through a second switch without a fraud model, to measure
    /// what scoring costs in the same run.
    #[arg(long, conflicts_with = "compare_no_journal")]
    pub compare_no_model: bool,
    /// First send the same load through a second switch that records no latency
    /// histograms, to measure what recording costs in the same run.
    #[arg(long, conflicts_with_all = ["compare_no_journal", "compare_no_model"])]
    pub compare_no_metrics: bool,
    /// Serve the admin API and the live dashboard here while the demo runs
    /// (e.g. 127.0.0.1:9583, then open http://127.0.0.1:9583/).
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// When journal records reach the disk: `always` or `never`.
    #[arg(long, value_enum, default_value = "always")]
    pub fsync: FsyncArg,
    /// Several nodes instead: three NATS servers (nats-server from PATH, `NATS_SERVER` or
    /// `.venv/bin`), this many `payswitch serve` nodes, two acquirers and a load spread
    /// over the nodes; one node is killed mid-run, then the books are checked.
    #[arg(long, value_name = "NODES")]
    pub cluster: Option<usize>,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    switch: Report,
    #[serde(skip_serializing_if = "Option::is_none")]
    direct: Option<Report>,
    /// The run through the switch without a journal or without a model.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<Report>,
}

/// A second switch the same load goes through first, without one part, to measure what
/// that part costs.
struct Baseline {
    /// "without a journal", ...
    without: &'static str,
    /// The part: "journal", ...
    what: &'static str,
    switch: RunningSwitch,
}

/// Runs the demo and prints its report.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if let Some(nodes) = args.cluster {
        return crate::demo_cluster::run(&args, nodes).await;
    }
    let (model, challenger) = champion_and_challenger(&args).await?;
    let replay = ReplayFile::generate(&args)?;
    let latency = args.acquirer_latency_us.map(Duration::from_micros);
    let north = start_sim("north", 1, latency).await?;
    let south = start_sim("south", 2, latency).await?;
    let journal = journal_config(&args);
    let baseline = start_baseline(&args, &north, &south, &model, &journal).await?;
    let running = start_switch(
        &north,
        &south,
        Some(model),
        journal.clone(),
        true,
        args.admin,
    )
    .await?;
    if let Some(challenger) = challenger {
        running
            .switch
            .scoring
            .add_challenger(Arc::new(challenger))
            .map_err(anyhow::Error::msg)?;
    }
    print_setup(&args, &running, &north, &south);
    let direct = if args.compare_direct {
        Some(run_direct(&args, &north, &replay.path).await?)
    } else {
        None
    };
    let baseline = match baseline {
        Some(baseline) => Some(run_baseline(&args, baseline, &replay.path).await?),
        None => None,
    };
    let target = running
        .quic_addr
        .context("the demo switch listens on QUIC")?;
    let trust = ClientTrust::Roots(vec![running.certificate.clone()]);
    let report = measure(&args, target, trust, &replay.path, "through the switch").await?;
    print_switch_figures(&running, &north, &south);
    print_shadow(&running);
    print_journal(&running, &journal);
    print_comparisons(&report, direct.as_ref(), baseline.as_ref());
    if let Some(path) = &args.json {
        write_json(path, report, direct, baseline.map(|(_, report)| report))?;
    }
    running.shutdown().await;
    north.shutdown().await;
    south.shutdown().await;
    Ok(())
}

/// The champion given with `--model` (and no challenger), or both trained at start.
async fn champion_and_challenger(args: &DemoArgs) -> anyhow::Result<(Model, Option<Model>)> {
    match &args.model {
        Some(path) => Ok((
            Model::load_file(path).with_context(|| format!("loading {}", path.display()))?,
            None,
        )),
        None => {
            let (model, challenger) = train_default_models().await?;
            Ok((model, Some(challenger)))
        }
    }
}

/// The journal of the demo's switch: `--journal`, or a new directory under the system's
/// temporary directory.
fn journal_config(args: &DemoArgs) -> JournalConfig {
    JournalConfig {
        enabled: !args.no_journal,
        dir: args.journal.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("payswitch-demo-journal-{}", std::process::id()))
        }),
        fsync: args.fsync.into(),
        ..JournalConfig::default()
    }
}

/// The switch without a journal, a model or latency recording that `--compare-no-*`
/// asks for, if any.
async fn start_baseline(
    args: &DemoArgs,
    north: &RunningSim,
    south: &RunningSim,
    model: &Model,
    journal: &JournalConfig,
) -> anyhow::Result<Option<Baseline>> {
    // The baselines with a journal write their own, next to the switch's.
    let separate = JournalConfig {
        dir: journal.dir.with_extension("baseline"),
        ..journal.clone()
    };
    let (without, what, switch) = if args.compare_no_journal {
        let off = JournalConfig {
            enabled: false,
            ..journal.clone()
        };
        let other = start_switch(north, south, Some(model.clone()), off, true, None).await?;
        ("without a journal", "journal", other)
    } else if args.compare_no_model {
        let other = start_switch(north, south, None, separate, true, None).await?;
        ("without a fraud model", "scoring", other)
    } else if args.compare_no_metrics {
        let other = start_switch(north, south, Some(model.clone()), separate, false, None).await?;
        ("without latency recording", "metrics", other)
    } else {
        return Ok(None);
    };
    Ok(Some(Baseline {
        without,
        what,
        switch,
    }))
}

fn print_setup(args: &DemoArgs, running: &RunningSwitch, north: &RunningSim, south: &RunningSim) {
    if let Some(addr) = running.admin_addr {
        println!("payswitch demo: live dashboard on http://{addr}/");
    }
    println!(
        "payswitch demo: switch on {} (QUIC), acquirers north {} and south {}",
        running
            .quic_addr
            .map_or_else(String::new, |a| a.to_string()),
        north.quic_addr,
        south.quic_addr,
    );
    println!(
        "  routes: BIN 4 -> north, BIN 51-55 -> south; load {:.0} TPS for {:?} over {} connection(s)\n",
        args.rate, args.duration, args.connections
    );
}

/// Runs the demo's load against `target`, trusting it with `trust`, under `title`, and
/// prints the report.
async fn measure(
    args: &DemoArgs,
    target: std::net::SocketAddr,
    trust: ClientTrust,
    data: &std::path::Path,
    title: &str,
) -> anyhow::Result<Report> {
    let config = load_config(args, target, trust, data);
    println!("-- {title}");
    let report = load::run(config).await?;
    print!("{}", report.render());
    Ok(report)
}

/// The same labeled traffic straight to acquirer north, every card to it.
async fn run_direct(
    args: &DemoArgs,
    north: &RunningSim,
    data: &std::path::Path,
) -> anyhow::Result<Report> {
    let trust = ClientTrust::Roots(vec![north.certificate.clone()]);
    let title = "direct to acquirer north (baseline)";
    let report = measure(args, north.quic_addr, trust, data, title).await?;
    println!();
    Ok(report)
}

/// The same traffic through the baseline switch, which is shut down after.
async fn run_baseline(
    args: &DemoArgs,
    baseline: Baseline,
    data: &std::path::Path,
) -> anyhow::Result<(&'static str, Report)> {
    let other = baseline.switch;
    let target = other.quic_addr.context("the demo switch listens on QUIC")?;
    let trust = ClientTrust::Roots(vec![other.certificate.clone()]);
    let title = format!("through a switch {} (baseline)", baseline.without);
    let report = measure(args, target, trust, data, &title).await?;
    println!();
    other.shutdown().await;
    Ok((baseline.what, report))
}

/// How often each challenger agreed with the champion.
fn print_shadow(running: &RunningSwitch) {
    use std::sync::atomic::Ordering::Relaxed;
    for c in running.switch.scoring.challengers().iter() {
        let (scored, agreed) = (c.scored.load(Relaxed), c.agreed.load(Relaxed));
        println!(
            "  shadow    challenger {} agreed with the champion on {agreed} of {scored} decisions ({:.2} %)",
            c.model.id(),
            100.0 * agreed as f64 / scored.max(1) as f64
        );
    }
}

/// What the journal wrote, and how to check it.
fn print_journal(running: &RunningSwitch, journal: &JournalConfig) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(stats) = running.switch.journal().map(|j| Arc::clone(j.stats())) else {
        return;
    };
    let commits = stats.commits.load(Relaxed).max(1);
    println!(
        "  journal   {} records in {} group commits ({:.1} records each, {:.0} us per write+sync), fsync {:?}\n            check it: payswitch journal verify {}",
        stats.records.load(Relaxed),
        stats.commits.load(Relaxed),
        stats.records.load(Relaxed) as f64 / commits as f64,
        stats.commit_ns.load(Relaxed) as f64 / commits as f64 / 1e3,
        journal.fsync,
        journal.dir.display(),
    );
}

/// The switch's run against the direct one and the baseline, where they ran.
fn print_comparisons(
    report: &Report,
    direct: Option<&Report>,
    baseline: Option<&(&'static str, Report)>,
) {
    if let Some(direct) = direct {
        println!(
            "\nswitch vs direct: p50 {} us vs {} us (+{} us), p99 {} us vs {} us, TPS {:.0} vs {:.0}",
            report.p50_us,
            direct.p50_us,
            report.p50_us.saturating_sub(direct.p50_us),
            report.p99_us,
            direct.p99_us,
            report.achieved_tps,
            direct.achieved_tps
        );
    }
    if let Some((what, off)) = baseline {
        println!(
            "\n{what} on vs off: p50 {} us vs {} us (+{} us), p99 {} us vs {} us (+{} us), TPS {:.0} vs {:.0}",
            report.p50_us,
            off.p50_us,
            report.p50_us.saturating_sub(off.p50_us),
            report.p99_us,
            off.p99_us,
            report.p99_us.saturating_sub(off.p99_us),
            report.achieved_tps,
            off.achieved_tps
        );
    }
}

fn write_json(
    path: &std::path::Path,
    switch: Report,
    direct: Option<Report>,
    baseline: Option<Report>,
) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&DemoReport {
        switch,
        direct,
        baseline,
    })?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

async fn start_sim(name: &str, seed: u64, latency: Option<Duration>) -> anyhow::Result<RunningSim> {
    let defaults = SimConfig::default();
    acquirer_sim::start(SimConfig {
        name: name.into(),
        seed,
        latency_median: latency.unwrap_or(defaults.latency_median),
        latency_max: latency.map_or(defaults.latency_max, |l| l * 4),
        ..defaults
    })
    .await
    .with_context(|| format!("starting acquirer simulator {name}"))
}

/// Rows of the population the default model is trained on.
const TRAINING_ROWS: u64 = 100_000;
/// Trees of the default model: half the reference forest, to train in about a
/// second at start.
const TRAINING_TREES: u16 = 50;

/// The champion (a forest) and a challenger to score in shadow (logistic regression),
/// both trained on the same generated population.
pub(crate) async fn train_default_models() -> anyhow::Result<(Model, Model)> {
    let started = Instant::now();
    let (model, challenger) = tokio::task::spawn_blocking(|| -> anyhow::Result<(Model, Model)> {
        let rows = workload::generate(&GenConfig::new(TRAINING_ROWS, 1))?;
        let options = TrainOptions {
            kind: ModelKind::Forest,
            trees: TRAINING_TREES,
            depth: 8,
            seed: 1,
            ..TrainOptions::default()
        };
        let forest = train::train(&rows, &options)?;
        let logistic = TrainOptions {
            kind: ModelKind::Logistic,
            ..options
        };
        Ok((forest, train::train(&rows, &logistic)?))
    })
    .await??;
    let m = &model.metadata().train_metrics;
    println!(
        "trained model {} ({} trees) on {TRAINING_ROWS} generated transactions in {:.1} s: training AUC-ROC {:.3}",
        model.id(),
        TRAINING_TREES,
        started.elapsed().as_secs_f64(),
        m.auc_roc,
    );
    println!(
        "  and a challenger {} (logistic regression) to score in shadow",
        challenger.id()
    );
    Ok((model, challenger))
}

/// The labeled traffic of the demo: another population (seed 2) than the model's, so the
/// fraud figures are out of sample. Removed when the demo ends.
pub(crate) struct ReplayFile {
    pub(crate) path: PathBuf,
}

impl ReplayFile {
    pub(crate) fn generate(args: &DemoArgs) -> anyhow::Result<ReplayFile> {
        let rows = (args.rate * args.duration.as_secs_f64()).ceil().max(1.0) as u64;
        let path = std::env::temp_dir().join(format!("payswitch-demo-{}.csv", std::process::id()));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        workload::write_workload(&GenConfig::new(rows, 2), std::io::BufWriter::new(file))?;
        Ok(ReplayFile { path })
    }
}

impl Drop for ReplayFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn start_switch(
    north: &RunningSim,
    south: &RunningSim,
    model: Option<Model>,
    journal: JournalConfig,
    metrics: bool,
    admin: Option<std::net::SocketAddr>,
) -> anyhow::Result<RunningSwitch> {
    let config = demo_config(north, south, journal, metrics, admin)?;
    // The simulators' self-signed certificates are the CAs: links are verified as in
    // production, with certificates made in memory.
    let security = Security {
        identity: TlsIdentity::self_signed(&["localhost", "127.0.0.1"])?,
        acquirer_trust: vec![
            ClientTrust::Roots(vec![north.certificate.clone()]),
            ClientTrust::Roots(vec![south.certificate.clone()]),
        ],
        gateways: None,
    };
    let running = switch::start(&config, security).await?;
    if let Some(model) = model {
        running
            .switch
            .scoring
            .set_champion(Arc::new(model))
            .map_err(anyhow::Error::msg)?;
    }
    wait_links_up(&running).await?;
    Ok(running)
}

/// The demo switch: QUIC on a loopback ephemeral port, BIN 4 to north and 51-55 to south.
fn demo_config(
    north: &RunningSim,
    south: &RunningSim,
    journal: JournalConfig,
    metrics: bool,
    admin: Option<std::net::SocketAddr>,
) -> anyhow::Result<Config> {
    let acquirer = |name: &str, sim: &RunningSim| AcquirerConfig {
        name: name.into(),
        address: sim.quic_addr,
        server_name: "localhost".into(),
        ca: None,
        timeout_ms: 2_000,
        max_in_flight: 4_096,
        breaker: Default::default(),
    };
    let route = |bins: &str, acquirer: &str| RouteConfig {
        bins: vec![bins.into()],
        currencies: vec![],
        mccs: vec![],
        acquirers: vec![acquirer.into()],
        balance: false,
        stand_in: None,
    };
    Ok(Config {
        listen: ListenConfig {
            quic: Some("127.0.0.1:0".parse()?),
            tcp: None,
            admin,
        },
        tls: None,
        pipeline: PipelineConfig {
            metrics,
            ..PipelineConfig::default()
        },
        scoring: ScoringConfig {
            // Replayed traffic carries its own timeline in field 7.
            event_time: EventTime::Transmission,
            ..ScoringConfig::default()
        },
        journal,
        cluster: None,
        acquirers: vec![acquirer("north", north), acquirer("south", south)],
        routes: vec![route("4", "north"), route("510000-559999", "south")],
        insecure_acquirers: false,
        source: None,
        admin_token: None,
    })
}

/// Waits until both acquirer links are connected, 10 s at most.
async fn wait_links_up(running: &RunningSwitch) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.switch.links().iter().all(|link| link.is_up()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "acquirer links did not come up in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

fn load_config(
    args: &DemoArgs,
    target: std::net::SocketAddr,
    trust: ClientTrust,
    data: &std::path::Path,
) -> LoadConfig {
    let mut config = LoadConfig::new(target, trust);
    config.rate_tps = args.rate;
    config.duration = args.duration;
    config.connections = args.connections;
    config.mode = if args.pipelined {
        Mode::QuicPipelined
    } else {
        Mode::QuicPerStream
    };
    config.data = Some(data.to_owned());
    config.progress = true;
    config
}

fn print_switch_figures(running: &RunningSwitch, north: &RunningSim, south: &RunningSim) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = &running.switch.stats;
    let links = running.switch.links();
    println!(
        "  switch    shed (queue full) {}, acquirer timeouts {}; simulators answered (all runs): north {}, south {}",
        stats.shed.load(Relaxed),
        links.iter().map(|l| l.stats.timeouts.load(Relaxed)).sum::<u64>(),
        north.stats.requests.load(Relaxed),
        south.stats.requests.load(Relaxed),
    );
}
