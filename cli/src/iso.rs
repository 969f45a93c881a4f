//! `payswitch iso decode|encode`: ISO 8583 messages as hex lines <-> JSON lines, over
//! stdin and stdout. The conversion is `payswitch::iso`.

use std::io::{self, Write};
use std::process::ExitCode;

use payswitch::iso::{decode_line, encode_line, run_lines};

/// The `iso` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum IsoCommand {
    /// Hex messages (one per line, no frame header) on stdin to JSON lines on stdout.
    Decode,
    /// JSON lines on stdin to hex messages on stdout.
    Encode,
}

/// Runs an `iso` subcommand over stdin/stdout.
pub fn run(command: IsoCommand) -> ExitCode {
    let convert = match command {
        IsoCommand::Decode => decode_line,
        IsoCommand::Encode => encode_line,
    };
    let mut input = io::stdin().lock();
    let mut output = io::stdout().lock();
    let mut errors = io::stderr().lock();
    match run_lines(&mut input, &mut output, &mut errors, convert) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            let _ = writeln!(errors, "error: {error}");
            ExitCode::FAILURE
        }
    }
}
