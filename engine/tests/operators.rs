//! What operators see, over real sockets: `/metrics` parsed by Prometheus's reference
//! parser under load, the admin API (with and without the token), and the dashboard as
//! headless Chromium renders it while a load runs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use payswitch::config::Config;
use payswitch::switch::RunningSwitch;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_loadtest::load::{self, LoadConfig};
use payswitch_net::ClientTrust;
use serde_json::Value;

mod support;

const TOKEN: &str = "operator-secret";

fn config(sim: &RunningSim) -> Config {
    Config {
        admin_token: Some(TOKEN.into()),
        ..support::config(vec![support::acquirer("north", sim, 2_000)], vec![])
    }
}

async fn start(sim: &RunningSim, config: &Config) -> RunningSwitch {
    support::in_front_of(sim, config.clone()).await
}

async fn sim() -> RunningSim {
    acquirer_sim::start(SimConfig {
        approval_rate: 0.9,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn load_config(switch: &RunningSwitch, rate: f64, duration: Duration) -> LoadConfig {
    let mut config = LoadConfig::new(
        switch.quic_addr.unwrap(),
        ClientTrust::Roots(vec![switch.certificate.clone()]),
    );
    config.rate_tps = rate;
    config.duration = duration;
    config.connections = 2;
    config
}

/// A blocking HTTP/1.1 exchange (run on a blocking thread from async tests).
fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http(addr, "GET", &path, None))
        .await
        .unwrap()
}

async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let (path, token) = (path.to_string(), token.map(str::to_string));
    tokio::task::spawn_blocking(move || http(addr, "POST", &path, token.as_deref()))
        .await
        .unwrap()
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// `/metrics` through Prometheus's reference parser (Python `prometheus_client`).
fn parse_prometheus(text: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/prom_parse.py");
    let python = support::python::interpreter();
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (scripts/test installs it)",
                python.display()
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the reference parser refused /metrics (is prometheus_client installed? scripts/test installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Checks every histogram family: per label set, cumulative buckets that never go down,
/// a `+Inf` bucket equal to `_count`, and a `_sum`.
fn check_histograms(families: &Value) -> usize {
    let mut checked = 0;
    for (name, family) in families.as_object().unwrap() {
        if family["type"] != "histogram" {
            continue;
        }
        let samples = family["samples"].as_array().unwrap();
        let mut series: std::collections::BTreeMap<String, Vec<(f64, f64)>> = Default::default();
        let mut counts = std::collections::BTreeMap::new();
        let mut sums = std::collections::BTreeMap::new();
        for s in samples {
            let (sample, labels, value) = (s[0].as_str().unwrap(), &s[1], s[2].as_f64().unwrap());
            let mut key_labels = labels.as_object().unwrap().clone();
            let le = key_labels.remove("le");
            let key = serde_json::to_string(&key_labels).unwrap();
            if sample.ends_with("_bucket") {
                let le = le.unwrap();
                let le = match le.as_str().unwrap() {
                    "+Inf" => f64::INFINITY,
                    other => other.parse().unwrap(),
                };
                series.entry(key).or_default().push((le, value));
            } else if sample.ends_with("_count") {
                counts.insert(key, value);
            } else if sample.ends_with("_sum") {
                sums.insert(key, value);
            }
        }
        assert!(!series.is_empty(), "{name}: no buckets");
        for (key, buckets) in series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{name}{key}: buckets not cumulative: {buckets:?}"
            );
            let last = buckets.last().unwrap();
            assert!(last.0.is_infinite(), "{name}{key}: no +Inf bucket");
            assert_eq!(
                Some(&last.1),
                counts.get(&key),
                "{name}{key}: +Inf != _count"
            );
            assert!(sums.contains_key(&key), "{name}{key}: no _sum");
            checked += 1;
        }
    }
    checked
}

fn sample(families: &Value, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    families[family]["samples"]
        .as_array()?
        .iter()
        .find_map(|s| {
            let l = s[1].as_object()?;
            let name = s[0].as_str()?;
            (!name.ends_with("_created")
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v)))
            .then(|| s[2].as_f64())
            .flatten()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_under_load_parse_with_the_reference_parser_and_counters_grow() {
    let sim = sim().await;
    let switch = start(&sim, &config(&sim)).await;
    let admin = switch.admin_addr.unwrap();
    let load = tokio::spawn(load::run(load_config(
        &switch,
        400.0,
        Duration::from_secs(3),
    )));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, during) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    let report = load.await.unwrap().unwrap();
    assert_eq!(report.errors, 0);
    tokio::time::sleep(Duration::from_millis(1_200)).await; // one collection
    let (_, after) = get(admin, "/metrics").await;
    let (during, after) = (parse_prometheus(&during), parse_prometheus(&after));
    let histograms = check_histograms(&after);
    assert!(
        histograms >= 11,
        "authorization + 9 stages + 1 acquirer: {histograms}"
    );
    check_histograms(&during);
    for family in [
        "payswitch_authorization_duration_seconds",
        "payswitch_stage_duration_seconds",
        "payswitch_acquirer_duration_seconds",
    ] {
        assert_eq!(after[family]["type"], "histogram", "{family}");
    }
    for (family, kind) in [
        ("payswitch_responses", "counter"),
        ("payswitch_decisions", "counter"),
        ("payswitch_acquirer_requests", "counter"),
        ("payswitch_in_flight_requests", "gauge"),
        ("payswitch_shard_queue_depth", "gauge"),
        ("payswitch_acquirer_up", "gauge"),
        ("payswitch_acquirer_state", "gauge"),
        ("payswitch_journal_queued_appends", "gauge"),
        ("payswitch_reversals_pending", "gauge"),
    ] {
        assert_eq!(after[family]["type"], kind, "{family}");
    }
    // Counters grow with traffic, and add up to what the load saw.
    let approved = |f: &Value| sample(f, "payswitch_responses", &[("code", "00")]).unwrap_or(0.0);
    assert!(approved(&after) > approved(&during), "responses_total grew");
    let answered = sample(
        &after,
        "payswitch_acquirer_requests",
        &[("acquirer", "north"), ("outcome", "answered")],
    )
    .unwrap();
    assert_eq!(answered as u64, report.answered);
    let count = sample(
        &after,
        "payswitch_stage_duration_seconds",
        &[("stage", "total")],
    );
    assert!(count.is_some());
    let total_count = after["payswitch_stage_duration_seconds"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[0] == "payswitch_stage_duration_seconds_count" && s[1]["stage"] == "total")
        .unwrap()[2]
        .as_f64()
        .unwrap();
    assert_eq!(
        total_count as u64, report.answered,
        "every request timed once"
    );
    assert_eq!(
        sample(&after, "payswitch_acquirer_up", &[("acquirer", "north")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &after,
            "payswitch_acquirer_state",
            &[("acquirer", "north"), ("state", "up")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reports_and_refuses_mutating_calls_without_the_token() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    // Started from a file, so that routes can be reloaded from it.
    let file = dir.path().join("payswitch.toml");
    let write_config = |bins: &str| {
        std::fs::write(
            &file,
            format!(
                "insecure_acquirers = true\nadmin_token = \"{TOKEN}\"\n\
                 [listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
                 [journal]\ndir = \"{}\"\n\
                 [[acquirers]]\nname = \"north\"\naddress = \"{}\"\n\
                 [[routes]]\nbins = [{bins}]\nacquirers = [\"north\"]\n",
                dir.path().join("journal").display(),
                sim.quic_addr
            ),
        )
        .unwrap()
    };
    write_config("\"4\"");
    let config = Config::from_file(&file).unwrap();
    let switch = start(&sim, &config).await;
    let admin = switch.admin_addr.unwrap();

    assert_eq!(get(admin, "/health").await.0, 200);
    let (status, body) = get(admin, "/ready").await;
    assert_eq!(
        (status, json(&body)["ready"].clone()),
        (200, Value::Bool(true))
    );
    let report = load::run(load_config(&switch, 200.0, Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(report.errors, 0);
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let (status, body) = get(admin, "/api/stats").await;
    assert_eq!(status, 200);
    let stats = json(&body);
    let stages: Vec<&str> = stats["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "decode", "validate", "queue", "score", "route", "journal", "acquirer", "switch",
            "total"
        ]
    );
    let total = stats["stages"][8]["since_start"].clone();
    assert_eq!(total["count"], report.answered);
    for p in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(total[p].as_f64().unwrap() > 0.0, "{p}: {total}");
    }
    assert!(total["p50_us"].as_f64() <= total["p99_us"].as_f64());
    assert!(stats["tps"].as_f64().unwrap() > 0.0, "{stats}");
    assert_eq!(stats["journal"]["enabled"], true);
    assert!(!stats["series"]["t"].as_array().unwrap().is_empty());

    let (_, body) = get(admin, "/api/acquirers").await;
    assert_eq!(json(&body)[0]["state"], "up");

    // Mutating calls: refused without the token, or with a wrong one.
    for path in [
        "/api/acquirers/north/drain",
        "/api/routes/reload",
        "/api/models/promote?id=x",
    ] {
        assert_eq!(post(admin, path, None).await.0, 401, "{path}");
        assert_eq!(post(admin, path, Some("wrong")).await.0, 401, "{path}");
    }
    assert_eq!(
        json(&get(admin, "/api/acquirers").await.1)[0]["state"],
        "up"
    );

    // Drain: no new authorization reaches it (91 with its only acquirer drained), and
    // /ready says so; enable puts it back.
    let (status, body) = post(admin, "/api/acquirers/north/drain", Some(TOKEN)).await;
    assert_eq!(
        (status, json(&body)["state"].clone()),
        (200, "draining".into())
    );
    assert_eq!(get(admin, "/ready").await.0, 503);
    let reached = sim
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let drained = load::run(load_config(&switch, 50.0, Duration::from_millis(200)))
        .await
        .unwrap();
    // Visa cards: 91, the only acquirer being drained; others have no route here (92).
    let codes: Vec<&str> = drained.codes.keys().map(String::as_str).collect();
    assert!(
        codes.contains(&"91") && codes.iter().all(|c| ["91", "92"].contains(c)),
        "{codes:?}"
    );
    assert_eq!(
        sim.stats
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        reached,
        "nothing reached a drained acquirer"
    );
    assert_eq!(
        post(admin, "/api/acquirers/north/enable", Some(TOKEN))
            .await
            .0,
        200
    );
    assert_eq!(get(admin, "/ready").await.0, 200);
    assert_eq!(
        post(admin, "/api/acquirers/nowhere/drain", Some(TOKEN))
            .await
            .0,
        404
    );

    // Routes: view, then reload after the file changed; a broken file is refused whole.
    let (_, body) = get(admin, "/api/routes").await;
    assert_eq!(json(&body)["routes"][0]["bins"], serde_json::json!(["4"]));
    write_config("\"4\", \"51\"");
    let (status, body) = post(admin, "/api/routes/reload", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(admin, "/api/routes").await;
    assert_eq!(
        json(&body)["routes"][0]["bins"],
        serde_json::json!(["4", "51"])
    );
    write_config("\"4X\"");
    assert_eq!(post(admin, "/api/routes/reload", Some(TOKEN)).await.0, 422);
    let (_, body) = get(admin, "/api/routes").await;
    assert_eq!(
        json(&body)["routes"][0]["bins"],
        serde_json::json!(["4", "51"])
    );

    // Models: promoting a challenger that is not there is a 404.
    assert_eq!(
        post(admin, "/api/models/promote?id=nope", Some(TOKEN))
            .await
            .0,
        404
    );
}

/// The dashboard as a person sees it: headless Chromium loads it while a load runs; its
/// figures appear, and change a few seconds later. The screenshot is kept under
/// `target/` (`docs/dashboard.png` in the repository is one such).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_in_a_real_browser() {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("headless Chromium is needed (scripts/test installs it: apt-get install chromium)");
    let sim = sim().await;
    let switch = start(&sim, &config(&sim)).await;
    let url = format!("http://{}/", switch.admin_addr.unwrap());
    // The load outlasts both renderings (each takes a few seconds), even on a slow machine,
    // so the last 10 s always hold traffic.
    let load = tokio::spawn(load::run(load_config(
        &switch,
        300.0,
        Duration::from_secs(15),
    )));
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let render = |extra: Vec<String>| {
        let chromium = chromium.to_string();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let output = Command::new(chromium)
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--virtual-time-budget=3000",
                    "--window-size=1600,1000",
                ])
                .args(extra)
                .arg(url)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        })
    };
    let first = render(vec!["--dump-dom".into()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let second = render(vec!["--dump-dom".into()]).await.unwrap();
    render(vec![format!("--screenshot={}", screenshot.display())])
        .await
        .unwrap();
    load.await.unwrap().unwrap();

    let value = |dom: &str, id: &str| -> String {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("no #{id} in the page"));
        let tag = &dom[at..];
        let start = tag.find('>').unwrap() + 1;
        let text = &tag[start..start + tag[start..].find('<').unwrap()];
        text.trim().to_string()
    };
    let number = |dom: &str, id: &str| -> f64 {
        value(dom, id)
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("#{id} is {:?}", value(dom, id)))
    };
    for dom in [&first, &second] {
        assert!(number(dom, "tps") > 0.0, "TPS shown");
        assert_eq!(value(dom, "acquirer-north-state"), "up");
        assert!(number(dom, "journal-records") > 0.0);
        assert!(!value(dom, "stage-switch-p99").is_empty());
    }
    assert_ne!(
        value(&first, "updated-at"),
        value(&second, "updated-at"),
        "the page updates itself"
    );
    assert!(
        number(&second, "journal-records") > number(&first, "journal-records"),
        "figures move with the traffic"
    );
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
}
