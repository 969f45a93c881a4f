//! `payswitch model train|eval|inspect|bench` through the binary, on a labeled file this
//! test builds itself (no dependency on gen-data).

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_payswitch");

/// A deterministic workload: 300 cards shopping at home with chip, and card-testing and
/// account-takeover fraud (bursts of small e-commerce amounts abroad, large high-risk spend).
fn write_labeled_csv(path: &Path, seed: u64) {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let mut lines = vec![payswitch_models::data::HEADER.join(",")];
    let start_s: u64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    let mut t = start_s;
    for i in 0..6000u64 {
        t += 1 + next() % 20;
        let fraud = i % 50 == 49;
        let card = if fraud { 1000 + i % 7 } else { next() % 300 };
        let (amount, mcc, merchant, country, pos) = if fraud {
            let big = i % 100 == 99;
            let amount = if big {
                150_000 + next() % 100_000
            } else {
                50 + next() % 150
            };
            (
                amount,
                if big { 4829 } else { 5999 },
                900 + next() % 50,
                566,
                10,
            )
        } else {
            (1000 + next() % 9000, 5411, next() % 40, 276, 51)
        };
        lines.push(format!(
            "{},4000{:012},{amount},978,{mcc},M{merchant:09},T{merchant:07},{country},{pos},{},{}",
            rfc3339(t),
            card,
            u8::from(fraud),
            if fraud { "card_testing" } else { "none" }
        ));
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn rfc3339(unix_s: u64) -> String {
    let days = unix_s / 86_400;
    let secs = unix_s % 86_400;
    // 2026-01-01 is day 20454; the test stays within January 2026.
    let day_of_month = days - 20_454 + 1;
    assert!(day_of_month <= 31);
    format!(
        "2026-01-{day_of_month:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    out
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn train_eval_inspect_both_kinds_and_refuse_a_corrupt_model() {
    let dir = tempfile::tempdir().unwrap();
    let train_csv = dir.path().join("train.csv");
    let test_csv = dir.path().join("test.csv");
    write_labeled_csv(&train_csv, 1);
    write_labeled_csv(&test_csv, 2);
    let train = train_csv.to_str().unwrap();
    let test = test_csv.to_str().unwrap();
    for (kind, extra) in [
        ("logistic", vec![]),
        ("forest", vec!["--trees", "20", "--depth", "6"]),
    ] {
        let model = dir.path().join(format!("{kind}.pswm"));
        let model = model.to_str().unwrap();
        let mut args = vec![
            "model", "train", "--data", train, "--kind", kind, "--out", model,
        ];
        args.extend(extra);
        ok(&args);
        let eval: serde_json::Value = serde_json::from_str(&ok(&[
            "model", "eval", "--data", test, "--model", model, "--json",
        ]))
        .unwrap();
        for key in [
            "n",
            "n_fraud",
            "auc_roc",
            "auc_pr",
            "recall_at_fpr",
            "fraud_amount_caught_minor",
        ] {
            assert!(eval.get(key).is_some(), "{kind}: {key} missing in {eval}");
        }
        for key in ["0.001", "0.005", "0.01"] {
            assert!(eval["recall_at_fpr"].get(key).is_some(), "{kind}: {key}");
        }
        assert_eq!(eval["n"], 6000);
        let auc = eval["auc_roc"].as_f64().unwrap();
        assert!(auc > 0.9, "{kind}: AUC-ROC {auc}");
        let inspect: serde_json::Value =
            serde_json::from_str(&ok(&["model", "inspect", model, "--json"])).unwrap();
        assert_eq!(inspect["kind"], kind);
        let pretty = ok(&["model", "inspect", model]);
        assert!(!pretty.contains("4000000000"), "no PAN in a model file");
        let bench: serde_json::Value =
            serde_json::from_str(&ok(&["model", "bench", "--model", model, "--json"])).unwrap();
        assert!(bench["score_p50_ns"].as_u64().is_some(), "{bench}");
    }
    let model = dir.path().join("forest.pswm");
    let bytes = std::fs::read(&model).unwrap();
    assert!(
        !bytes.windows(10).any(|w| w == b"4000000000"),
        "no PAN bytes in the file"
    );
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 1;
    let bad = dir.path().join("corrupt.pswm");
    std::fs::write(&bad, corrupt).unwrap();
    let out = run(&["model", "inspect", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
}
