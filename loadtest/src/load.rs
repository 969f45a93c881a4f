//! The load generator. (Being written.)

/// Command-line arguments of `payswitch load`.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {}

/// Runs a load and prints its report.
pub async fn run_cli(_args: LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("load is not built yet")
}
