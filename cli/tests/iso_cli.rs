//! `payswitch iso decode|encode` run as a user would: the built binary, stdin in, stdout and
//! stderr out.

use std::io::Write;
use std::process::{Command, Stdio};

/// The 0100 example of DESIGN.md (without the frame header).
const DESIGN_EXAMPLE_HEX: &str = "303130307220440008c0800031363431313131313131313131313131313130303030303030303030303030313235303031313235313233303435303030303031353431313035313533333031323030303030315445524d303030314d45524348414e5430303030303031383430";

/// The fields DESIGN.md lists for the example, in ascending order.
const DESIGN_EXAMPLE_JSON: &str = r#"{"mti":"0100","fields":{"2":"4111111111111111","3":"000000","4":"000000012500","7":"1125123045","11":"000001","18":"5411","22":"051","37":"533012000001","41":"TERM0001","42":"MERCHANT0000001","49":"840"}}"#;

const PAN: &str = "4111111111111111";

struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

fn iso(subcommand: &str, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_payswitch"))
        .args(["iso", subcommand])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the payswitch binary starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "the tool panicked: {stderr}");
    Output {
        success: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr,
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn design_example_decodes_to_exactly_the_listed_fields() {
    let out = iso("decode", &format!("{DESIGN_EXAMPLE_HEX}\n"));
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stderr, "");
    // Byte-exact: MTI first, field keys in ascending numeric order, no bitmaps.
    assert_eq!(out.stdout, format!("{DESIGN_EXAMPLE_JSON}\n"));
}

#[test]
fn design_example_json_encodes_to_the_exact_hex() {
    let out = iso("encode", &format!("{DESIGN_EXAMPLE_JSON}\n"));
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{DESIGN_EXAMPLE_HEX}\n"));
}

#[test]
fn surrounding_whitespace_and_empty_lines_are_tolerated() {
    let input = format!("\n   \n\t{}  \r\n\n", DESIGN_EXAMPLE_HEX.to_uppercase());
    let out = iso("decode", &input);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(out.stdout, format!("{DESIGN_EXAMPLE_JSON}\n"));
}

#[test]
fn binary_fields_round_trip_as_lowercase_hex() {
    let input = r#"{"mti":"0200","fields":{"2":"4111111111111111","52":"0123456789ABCDEF","55":"9F2608A1B2C3D4E5F60718"}}"#;
    let encoded = iso("encode", &format!("{input}\n"));
    assert!(encoded.success, "{}", encoded.stderr);
    let hex = encoded.stdout.trim();
    assert_eq!(hex, hex.to_lowercase());
    // PIN block raw after the PAN, ICC data with its ASCII LLL prefix "011".
    assert!(hex.contains("0123456789abcdef303131"), "{hex}");

    let decoded = iso("decode", &encoded.stdout);
    assert!(decoded.success, "{}", decoded.stderr);
    let value = json(&decoded.stdout);
    assert_eq!(value["fields"]["52"], "0123456789abcdef");
    assert_eq!(value["fields"]["55"], "9f2608a1b2c3d4e5f60718");
    assert_eq!(value, json(&input.to_lowercase()));
}

#[test]
fn field_above_64_round_trips_through_the_secondary_bitmap() {
    let input = r#"{"mti":"0800","fields":{"7":"1125123045","11":"000001","70":"301"}}"#;
    let encoded = iso("encode", &format!("{input}\n"));
    assert!(encoded.success, "{}", encoded.stderr);
    let hex = encoded.stdout.trim();
    // MTI, then a primary bitmap with bit 1 set (secondary present) and bits 7 and 11.
    assert!(hex.starts_with("30383030" /* 0800 */), "{hex}");
    assert_eq!(&hex[8..24], "8220000000000000");
    // Secondary bitmap: bit 70 is bit 6 of the second 64.
    assert_eq!(&hex[24..40], "0400000000000000");

    let decoded = iso("decode", &encoded.stdout);
    assert!(decoded.success, "{}", decoded.stderr);
    assert_eq!(decoded.stdout.trim(), input);
}

/// Asserts `stderr` has exactly one line per entry of `expected`, each naming its line
/// number and containing the given reason.
fn assert_errors(stderr: &str, expected: &[(usize, &str)]) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "stderr:\n{stderr}");
    for (line, (number, reason)) in lines.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("line {number}: ")),
            "{line:?} should name line {number}"
        );
        assert!(line.contains(reason), "{line:?} should say {reason:?}");
    }
}

#[test]
fn malformed_hex_lines_each_get_one_error_and_valid_lines_still_print() {
    let truncated = &DESIGN_EXAMPLE_HEX[..200]; // cut inside field 42
    let mut not_ascii = DESIGN_EXAMPLE_HEX.to_string();
    not_ascii.replace_range(216.., "ff"); // last byte of field 49
    let input = [
        DESIGN_EXAMPLE_HEX,
        &DESIGN_EXAMPLE_HEX[..51], // odd number of digits
        truncated,
        "30313030zz",
        &not_ascii,
        "303130", // three bytes: not even an MTI
        DESIGN_EXAMPLE_HEX,
    ]
    .join("\n");
    let out = iso("decode", &input);
    assert!(!out.success, "a bad line must make the exit code non-zero");
    assert_eq!(
        out.stdout,
        format!("{DESIGN_EXAMPLE_JSON}\n{DESIGN_EXAMPLE_JSON}\n")
    );
    assert_errors(
        &out.stderr,
        &[
            (2, "not hex: odd number of hex digits (51)"),
            (3, "field 42: truncated: needs 15 bytes, 9 left"),
            (4, "not hex: not a hex digit at offset 8"),
            (5, "field 49: non-ASCII byte at offset 2"),
            (6, "truncated MTI"),
        ],
    );
}

#[test]
fn malformed_json_lines_each_get_one_error_and_valid_lines_still_print() {
    let input = [
        r#"{"mti":"0100","fields":{"2":"4111111111111111","3":"000000""#, // cut short
        DESIGN_EXAMPLE_JSON,
        r#"{"mti":"0100","fields":{"200":"x"}}"#,
        r#"{"mti":"0100","fields":{"3":"0000"}}"#,
        r#"{"mti":"0100","fields":{"55":"9f2"}}"#,
        r#"{"mti":"0100","fields":{"52":"00112233445566zz"}}"#,
        r#"{"mti":"0100","fields":{"4":12500}}"#,
        r#"{"mti":"01000","fields":{}}"#,
        r#"{"mti":"0100","fields":{"2":"41111111111111111111"}}"#,
        r#"{"mti":"0100","fields":{"48":"café"}}"#,
        r#"{"mti":"0800","fields":{"70":"301"}}"#,
    ]
    .join("\n");
    let out = iso("encode", &input);
    assert!(!out.success, "a bad line must make the exit code non-zero");
    let printed: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(printed.len(), 2, "{}", out.stdout);
    assert_eq!(printed[0], DESIGN_EXAMPLE_HEX);
    assert!(printed[1].starts_with("30383030"));
    assert_errors(
        &out.stderr,
        &[
            (1, "bad JSON: EOF while parsing"),
            (3, "no field 200: data fields are 2..=128"),
            (4, "field 3: length 4, the field is fixed at 6"),
            (
                5,
                "field 55: binary value is not hex: odd number of hex digits",
            ),
            (
                6,
                "field 52: binary value is not hex: not a hex digit at offset 14",
            ),
            (7, "field 4: value is not a JSON string"),
            (8, "MTI: expected 4 characters, got 5"),
            (9, "field 2: length 20 exceeds the maximum 19"),
            (10, "field 48: non-ASCII byte at offset 3"),
        ],
    );
}

#[test]
fn errors_for_bad_messages_never_contain_the_pan() {
    // Decode: the example with its PAN intact and field 42 cut short.
    let decode = iso("decode", &format!("{}\n", &DESIGN_EXAMPLE_HEX[..200]));
    // Encode: a PAN next to a bad field, a PAN that is itself too long, a PAN used as a
    // field key, and a PAN in broken JSON.
    let encode_input = [
        format!(r#"{{"mti":"0100","fields":{{"2":"{PAN}","49":"8400"}}}}"#),
        format!(r#"{{"mti":"0100","fields":{{"2":"{PAN}0000"}}}}"#),
        format!(r#"{{"mti":"0100","fields":{{"{PAN}":"x"}}}}"#),
        format!(r#"{{"mti":"0100","fields":{{"2":"{PAN}" "3":"000000"}}}}"#),
        format!(r#"{{"mti":"0100","fields":{{"2":"{PAN}\u00e9"}}}}"#),
    ]
    .join("\n");
    let encode = iso("encode", &encode_input);
    for out in [&decode, &encode] {
        assert!(!out.success);
        assert_eq!(out.stdout, "");
        assert!(!out.stderr.is_empty());
        // Not even the first 12 digits: a masked PAN shows 6 + 4 at most.
        assert!(!out.stderr.contains(&PAN[..12]), "{}", out.stderr);
        assert!(!out.stderr.contains("31313131"), "{}", out.stderr);
    }
    assert_eq!(decode.stderr.lines().count(), 1);
    assert_eq!(encode.stderr.lines().count(), 5, "{}", encode.stderr);
}
