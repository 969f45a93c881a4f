//! The acquirer simulator. (Being written.)

/// Command-line arguments of `payswitch acquirer-sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {}

/// Runs the simulator until Ctrl-C.
pub async fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("acquirer-sim is not built yet")
}
