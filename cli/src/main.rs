//! `payswitch`: the switch and its tools in one binary.
//!
//! The binary is thin: each module parses one subcommand's arguments and runs it over the
//! libraries — the switch (`payswitch`), the models (`payswitch_models`) and the load tools
//! (`payswitch_loadtest`).
//!
//! - [`serve`]: `payswitch serve`, flags and config file to a running switch.
//! - [`demo`]: `payswitch demo`, simulated acquirers, the switch and a load in one process.
//! - [`model`]: `payswitch model train|eval|inspect|bench|deploy`.
//! - [`journal`]: `payswitch journal verify|export|bench`.
//! - [`cluster`]: `payswitch cluster status`.
//! - [`iso`]: `payswitch iso decode|encode`.
//! - [`sim`]: `payswitch sim`, the deterministic simulator.
//! - [`logging`]: the `tracing` subscriber.
//!
//! `acquirer-sim`, `load` and `gen-data` take their arguments from `payswitch_loadtest`.

mod cluster;
mod demo;
mod demo_cluster;
mod iso;
mod journal;
mod logging;
mod model;
mod serve;
mod sim;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// payswitch — a card-payment authorization switch speaking ISO 8583 over QUIC.
#[derive(Parser, Debug)]
#[command(name = "payswitch", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the switch.
    Serve(serve::ServeArgs),
    /// Two simulated acquirers, the switch and a load, in one process: the first command to try.
    Demo(demo::DemoArgs),
    /// Run a simulated acquirer/issuer.
    AcquirerSim(payswitch_loadtest::acquirer_sim::SimArgs),
    /// Send an open-loop load of authorizations and report latency and response codes.
    Load(payswitch_loadtest::load::LoadArgs),
    /// Write a labeled synthetic workload (cards, merchants, fraud scenarios) as CSV.
    GenData(payswitch_loadtest::workload::GenDataArgs),
    /// Fraud models: train, evaluate, inspect, benchmark.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// ISO 8583 tooling: hex <-> JSON, one message per line.
    #[command(subcommand)]
    Iso(iso::IsoCommand),
    /// The journal: verify checksums and sequence, export records.
    #[command(subcommand)]
    Journal(journal::JournalCommand),
    /// The deterministic simulator: the switch's own code under faults, replayed by seed.
    Sim(sim::SimArgs),
    /// Several nodes on NATS JetStream: leases and the journal stream.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Iso(command) => iso::run(command),
        Command::GenData(args) => report(payswitch_loadtest::workload::run(args)),
        Command::Model(command) => report(model::run(command)),
        Command::Journal(command) => report(journal::run(command)),
        Command::Sim(args) => report(sim::run(args)),
        Command::Cluster(command) => report(cluster::run(command)),
        command => {
            logging::init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(async move {
                match command {
                    Command::Serve(args) => serve::run(args).await,
                    Command::Demo(args) => demo::run(args).await,
                    Command::AcquirerSim(args) => payswitch_loadtest::acquirer_sim::run(args).await,
                    Command::Load(args) => payswitch_loadtest::load::run_cli(args).await,
                    Command::Iso(_)
                    | Command::GenData(_)
                    | Command::Model(_)
                    | Command::Journal(_)
                    | Command::Sim(_)
                    | Command::Cluster(_) => {
                        unreachable!("handled above")
                    }
                }
            });
            report(result)
        }
    }
}

fn report(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
