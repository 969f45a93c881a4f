//! `payswitch model train|eval|inspect|bench`. (Being written.)

/// The `model` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ModelCommand {}

/// Runs a `model` subcommand.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {}
}
