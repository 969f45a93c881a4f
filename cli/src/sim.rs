//! `payswitch sim`: the deterministic simulator of the whole switch (`payswitch::sim`).

use std::time::Instant;

use payswitch::sim::{self, Bug, Faults, Options};

/// Runs the switch's own code on a simulated clock, network and disk, with faults, and
/// checks its invariants after every event. The same seed prints the same line.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// The seed: everything random follows from it, so a seed replays its run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Simulated authorizations per seed (retransmissions and reversals come on top).
    #[arg(long, default_value_t = 20_000)]
    pub steps: u64,
    /// Seeds to run, from --seed on: one line each.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Fault families: `all`, `survived` (all but those the switch is known not to
    /// survive yet), or a comma-separated list of network, acquirers, slow-acquirers,
    /// crashes, overload.
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Plant a bug in the simulator's driver, to see the invariants catch it.
    #[arg(long, value_enum)]
    pub bug: Option<BugArg>,
}

/// Bugs the simulator can plant.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum BugArg {
    /// Report records durable when written, before they are synced.
    DurableBeforeSync,
}

/// Runs the seeds; fails when any broke an invariant.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let faults = Faults::parse(&args.faults).map_err(anyhow::Error::msg)?;
    let bug = args.bug.map(|bug| match bug {
        BugArg::DurableBeforeSync => Bug::DurableBeforeSync,
    });
    let started = Instant::now();
    let mut authorizations = 0;
    let mut broken = Vec::new();
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let report = sim::run(Options {
            seed,
            authorizations: args.steps,
            faults,
            bug,
        });
        authorizations += report.authorizations;
        println!("{report}");
        if report.violation.is_some() {
            broken.push(seed);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Timings go to stderr: stdout is the same for the same seed.
    eprintln!(
        "{authorizations} simulated authorizations over {} seed(s) in {elapsed:.1}s: {:.0} a second",
        args.seeds,
        authorizations as f64 / elapsed.max(1e-9)
    );
    if broken.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invariants broken with seed(s) {broken:?}")
    }
}
