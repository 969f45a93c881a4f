//! `payswitch demo`. (Being written.)

/// Arguments of `payswitch demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

/// Runs the demo.
pub async fn run(_args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("demo is not built yet")
}
