"""What the real-process benches share: the release binary, free loopback ports,
starting processes with their logs in a work directory, waiting for a switch's /ready and
reading its /api/stats."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("PAYSWITCH_BIN") or os.path.join(ROOT, "target", "release", "payswitch")


def free_port(kind=socket.SOCK_DGRAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(admin, deadline_s=30):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit("the switch never became ready")


def spawner(work, procs, mode="w"):
    """A function starting `cmd` with its output in `work/log`, remembered in `procs`."""
    def spawn(cmd, log):
        out = open(os.path.join(work, log), mode)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc
    return spawn


def stats(admin):
    """The switch's /api/stats."""
    with urllib.request.urlopen(f"http://{admin}/api/stats", timeout=5) as r:
        return json.load(r)


def pan_hash_key(work):
    """A PAN hash key file (0600) every node of a cluster shares."""
    key = os.path.join(work, "pan-hash.key")
    with open(key, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    os.chmod(key, 0o600)
    return key


def node_config(work, name, block, quic, admin, acquirer_port, key, fsync="always",
                servers=(), cluster_settings="", scoring=""):
    """Writes switch node `name`'s configuration (STAN block `block`; `[cluster]` when
    `servers` are given, with `cluster_settings` lines added) in front of the acquirer
    simulator on `acquirer_port`; returns its path."""
    config = os.path.join(work, f"switch-{name}.toml")
    with open(config, "w") as f:
        f.write(f"insecure_acquirers = true\n[listen]\nquic = \"127.0.0.1:{quic}\"\n"
                f"admin = \"{admin}\"\n")
        if scoring:
            f.write(f"[scoring]\n{scoring}")
        f.write(f"[journal]\ndir = \"{os.path.join(work, 'journal-' + name)}\"\n"
                f"pan_hash_key_file = \"{key}\"\nfsync = \"{fsync}\"\n")
        if servers:
            f.write(f"[cluster]\nservers = {json.dumps(list(servers))}\nnode = \"{name}\"\n"
                    f"stan_block = {block}\n{cluster_settings}")
        f.write(f"[[acquirers]]\nname = \"sim\"\naddress = \"127.0.0.1:{acquirer_port}\"\n")
    return config


def cpu_s(pid):
    """User plus system CPU seconds of a process so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def stop(procs):
    """SIGTERM to every process still running, then waits; kills one that lingers 15 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def cpu_while(load, watched, sample=None):
    """Waits for the process `load` to end; returns the CPU seconds each of `watched`
    (name -> process) spent meanwhile, and `load`'s own as "load" (its last quarter second
    unseen). `sample`, when given, is called every 250 ms while waiting."""
    before = {name: cpu_s(proc.pid) for name, proc in watched.items()}
    load_cpu = 0.0
    while load.poll() is None:
        if sample:
            sample()
        load_cpu = cpu_s(load.pid) or load_cpu
        time.sleep(0.25)
    cpu = {name: (cpu_s(proc.pid) or 0.0) - (before[name] or 0.0)
           for name, proc in watched.items()}
    cpu["load"] = load_cpu
    return cpu
