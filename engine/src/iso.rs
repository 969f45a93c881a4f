//! `payswitch iso decode|encode`. (Being written.)

/// The `iso` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum IsoCommand {
    /// Hex messages (one per line, no frame header) on stdin to JSON lines on stdout.
    Decode,
    /// JSON lines on stdin to hex messages on stdout.
    Encode,
}

/// Runs an `iso` subcommand over stdin/stdout.
pub fn run(_command: IsoCommand) -> std::process::ExitCode {
    std::process::ExitCode::FAILURE
}
