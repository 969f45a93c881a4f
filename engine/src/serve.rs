//! `payswitch serve`. (Being written.)

/// Arguments of `payswitch serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

/// Runs the switch.
pub async fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not built yet")
}
