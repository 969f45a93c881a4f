//! `payswitch gen-data`. (Being written.)

/// Arguments of `payswitch gen-data`.
#[derive(clap::Args, Debug, Clone)]
pub struct GenDataArgs {}

/// Writes a labeled workload file.
pub fn run(_args: GenDataArgs) -> anyhow::Result<()> {
    anyhow::bail!("gen-data is not built yet")
}
