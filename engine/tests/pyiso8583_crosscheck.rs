//! Cross-check of the codec against an independent implementation, Python's pyiso8583,
//! whose `iso8583.specs.default` is the same 1987 layout as shared/iso8583-fields.tsv.
//!
//! Both directions: messages pyiso8583 encodes decode here to the same fields and re-encode
//! byte for byte; messages encoded here decode in pyiso8583 to the same fields. The Python
//! side is `pyiso8583_crosscheck.py` beside this file. These tests need python3 with
//! pyiso8583 (`scripts/test` installs it) and fail, rather than skip, without it.
//!
//! Field 65 is not compared: see the note in the Python script.

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use payswitch::iso::{decode_line, message_from_json, message_to_json};
use payswitch_protocol::spec::{self, Encoding, LengthPrefix};
use payswitch_protocol::{Message, Mti};
use serde_json::Value;

#[path = "support/python.rs"]
mod python;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pyiso8583_crosscheck.py");

const FIELDS_TSV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../protocol/iso8583-fields.tsv"
);

const DESIGN_EXAMPLE_HEX: &str = "303130307220440008c0800031363431313131313131313131313131313130303030303030303030303030313235303031313235313233303435303030303031353431313035313533333031323030303030315445524d303030314d45524348414e5430303030303031383430";

/// Seed and size of the random corpus: fixed, so a failure replays exactly.
const PYTHON_SEED: u64 = 8583;
const PYTHON_MESSAGES: usize = 400;
const RUST_SEED: u64 = 0x1987_0100;
const RUST_MESSAGES: usize = 300;

const INSTALL_HINT: &str = "this test needs python3 with pyiso8583: `scripts/test` installs it \
     in .venv (set PYTHON to use another interpreter)";

/// Runs the Python side with `args`, feeding `stdin`; returns its stdout.
fn python(args: &[&str], stdin: &str) -> String {
    let interpreter = python::interpreter().display().to_string();
    let mut child = match Command::new(&interpreter)
        .arg(SCRIPT)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!("cannot run {interpreter}: {e}; {INSTALL_HINT}"),
    };
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_owned();
    // Written from a thread so a large input cannot deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || input.write_all(stdin.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.code() != Some(3),
        "pyiso8583 is missing: {stderr}\n{INSTALL_HINT}"
    );
    assert!(
        output.status.success(),
        "{SCRIPT} {args:?} failed ({}): {stderr}",
        output.status
    );
    String::from_utf8(output.stdout).unwrap()
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn pyiso8583_default_spec_is_the_shared_field_table() {
    let tsv = std::fs::read_to_string(FIELDS_TSV).unwrap();
    let out = python(&["check-spec"], &tsv);
    assert_eq!(out.trim(), "130 rows match");
}

#[test]
fn design_example_decodes_identically_in_pyiso8583() {
    let theirs = parse_lines(&python(&["decode"], DESIGN_EXAMPLE_HEX));
    let ours: Value =
        serde_json::from_str(&decode_line(DESIGN_EXAMPLE_HEX.as_bytes()).unwrap()).unwrap();
    assert_eq!(theirs, vec![ours.clone()]);
    assert_eq!(ours["fields"].as_object().unwrap().len(), 11);
    assert_eq!(ours["fields"]["2"], "4111111111111111");
}

#[test]
fn messages_encoded_by_pyiso8583_decode_and_reencode_identically_here() {
    let generated = python(
        &[
            "generate",
            &PYTHON_SEED.to_string(),
            &PYTHON_MESSAGES.to_string(),
        ],
        "",
    );
    let cases = parse_lines(&generated);
    assert_eq!(cases.len(), PYTHON_MESSAGES);
    let mut with_secondary = 0;
    for (index, case) in cases.iter().enumerate() {
        let hex = case["hex"].as_str().unwrap();
        let expected = serde_json::json!({"mti": case["mti"], "fields": case["fields"]});
        let wire = Bytes::from(hex::decode(hex).unwrap());
        let message = Message::decode(wire.clone())
            .unwrap_or_else(|e| panic!("message {index}: pyiso8583's encoding refused: {e}"));
        assert_eq!(message_to_json(&message), expected, "message {index}");
        assert_eq!(message.to_bytes(), wire, "message {index}: re-encoding");
        // The CLI's text form too: same as Python's compact JSON, field order included.
        let line = decode_line(hex.as_bytes()).unwrap();
        assert_eq!(
            Some(line.as_str()),
            case["json"].as_str(),
            "message {index}"
        );
        // And the JSON form encodes to pyiso8583's bytes.
        let built = message_from_json(&expected).unwrap();
        assert_eq!(
            built.to_bytes(),
            wire,
            "message {index}: encoding from JSON"
        );
        with_secondary += usize::from(message.field_numbers().any(|n| n > 64));
    }
    assert!(with_secondary > PYTHON_MESSAGES / 4, "{with_secondary}");
}

/// splitmix64: a seeded generator small enough to keep here, so the Rust side of the
/// corpus does not depend on a crate's generator staying the same across versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..=max` for test data.
    fn up_to(&mut self, max: usize) -> usize {
        (self.next() % (max as u64 + 1)) as usize
    }
}

fn random_value(rng: &mut SplitMix64, number: u8) -> Vec<u8> {
    let field = spec::field(number).unwrap();
    let max = usize::from(field.max_len);
    let len = match field.prefix {
        LengthPrefix::Fixed => max,
        LengthPrefix::LlVar | LengthPrefix::LllVar => match rng.up_to(3) {
            0 => 0,
            1 => max,
            _ => rng.up_to(max),
        },
    };
    (0..len)
        .map(|_| match field.encoding {
            // Printable ASCII, as gateways send.
            Encoding::Ascii => 0x20 + rng.up_to(0x7e - 0x20) as u8,
            Encoding::Binary => rng.next() as u8,
        })
        .collect()
}

fn random_message(rng: &mut SplitMix64, index: usize) -> Message {
    let mti = format!("{:04}", rng.up_to(9999));
    let mut builder = Message::builder(Mti::parse(mti.as_bytes()).unwrap());
    let highest = if index.is_multiple_of(2) { 64 } else { 128 };
    // Field 65 is skipped: see the module doc.
    let mut numbers: Vec<u8> = (0..rng.up_to(24))
        .map(|_| 2 + rng.up_to(highest - 2) as u8)
        .chain(std::iter::once(2 + (index % 127) as u8))
        .filter(|&n| n != 65)
        .collect();
    numbers.sort_unstable();
    numbers.dedup();
    for number in numbers {
        let value = random_value(rng, number);
        builder.set(number, &value).unwrap();
    }
    builder.build()
}

#[test]
fn messages_encoded_here_decode_identically_in_pyiso8583() {
    let mut rng = SplitMix64(RUST_SEED);
    let messages: Vec<Message> = (0..RUST_MESSAGES)
        .map(|index| random_message(&mut rng, index))
        .collect();
    let input: String = messages
        .iter()
        .map(|m| hex::encode(m.to_bytes()) + "\n")
        .collect();
    let decoded = parse_lines(&python(&["decode"], &input));
    assert_eq!(decoded.len(), messages.len());
    for (index, (message, theirs)) in messages.iter().zip(&decoded).enumerate() {
        assert_eq!(theirs, &message_to_json(message), "message {index}");
    }
}
