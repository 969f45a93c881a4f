#!/usr/bin/env python3
"""What durability costs: the local journal's fdatasync against the journal on NATS
JetStream (R=1 on one server, R=3 on a three-server cluster), at the same offered load,
each process its own: nats-server(s), an acquirer simulator, the switch, the load.

    python3 bench/cluster_journal.py --mode local --rate 2000 --duration 15
    python3 bench/cluster_journal.py --mode r1 --rate 2000 --duration 15
    python3 bench/cluster_journal.py --mode r3 --rate 2000 --duration 15
    python3 bench/cluster_journal.py --mode r3-fsync --rate 2000 --duration 15
    python3 bench/cluster_journal.py --mode r3-sync --rate 2000 --duration 15
    python3 bench/cluster_journal.py --mode r3 --nodes 3 --rate 2000 --duration 15 --pipelined

Modes: `local` (fsync always, no cluster), `r1` / `r3` (the stream's acknowledgement is the
durability point: local segments written without fsync), `r3-fsync` (both), `r3-sync` (as
`r3`, the servers syncing every write to disk before acknowledging: `sync_interval:
always`). `--nodes N` runs N switch nodes (a, b, c…) on the same servers, the load spread
over them. Prints the journal stage's and the switch's own p50/p99 (read → answered,
`/api/stats`) per node, what the gateway saw, the CPU seconds of each process while the
load ran, each node's resident memory and how far its follower of the others' journals
lagged.

Needs the release binary (cargo build --release --bin payswitch) and nats-server
(`scripts/test` installs it in .venv; NATS_SERVER to use another).
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

from procs import (BIN, ROOT, cpu_while, free_port, node_config, pan_hash_key, spawner, stats,
                   stop, wait_ready)


def nats_binary():
    return (os.environ.get("NATS_SERVER")
            or os.path.join(ROOT, ".venv", "bin", "nats-server"))


def wait_port(port, deadline_s=10):
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_nats(spawn, work, count, sync_always=False):
    """`count` servers (one: standalone; three: a cluster), JetStream on; client ports."""
    client = [free_port(socket.SOCK_STREAM) for _ in range(count)]
    route = [free_port(socket.SOCK_STREAM) for _ in range(count)]
    procs = []
    for i in range(count):
        cmd = [nats_binary(), "-a", "127.0.0.1", "-p", str(client[i]), "-js", "-n", f"n{i}"]
        if not sync_always:
            cmd += ["-sd", os.path.join(work, f"nats{i}")]
        else:
            conf = os.path.join(work, f"nats{i}.conf")
            with open(conf, "w") as f:
                f.write(f"jetstream {{\n  store_dir: \"{os.path.join(work, f'nats{i}')}\"\n"
                        "  sync_interval: always\n}\n")
            cmd += ["-c", conf]
        if count > 1:
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(route) if j != i)
            cmd += ["--cluster_name", "bench", "--cluster", f"nats://127.0.0.1:{route[i]}",
                    "--routes", routes]
        procs.append(spawn(cmd, f"nats{i}.log"))
    for port in client:
        wait_port(port)
    if count > 1:
        time.sleep(3.0)  # the JetStream meta leader is elected
    return client, procs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["local", "r1", "r3", "r3-fsync", "r3-sync"], required=True)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--pipelined", action="store_true", help="pipelined streams, not one per request")
    p.add_argument("--nodes", type=int, default=1, help="switch nodes (with a cluster mode)")
    p.add_argument("--no-events", action="store_true", help="cluster.events = false")
    p.add_argument("--no-shared-velocity", action="store_true",
                   help="cluster.shared_velocity = false")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="payswitch-cluster-")
    procs = []
    spawn = spawner(work, procs)
    acq_port = free_port()
    if args.mode == "local" and args.nodes != 1:
        raise SystemExit("--nodes needs a cluster mode")
    names = [chr(ord("a") + i) for i in range(args.nodes)]
    quic = {n: free_port() for n in names}
    admins = {n: f"127.0.0.1:{free_port(socket.SOCK_STREAM)}" for n in names}
    cpu = {}
    rss = {}
    lag = {n: 0 for n in names}
    try:
        servers = []
        nats = []
        if args.mode != "local":
            ports, nats = start_nats(spawn, work, 1 if args.mode == "r1" else 3,
                                     sync_always=args.mode == "r3-sync")
            servers = [f"nats://127.0.0.1:{p}" for p in ports]
        acquirer = spawn([BIN, "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}",
                          "--approval-rate", "1"], "acquirer.log")
        fsync = "never" if args.mode in ("r1", "r3", "r3-sync") else "always"
        key = pan_hash_key(work)
        switches = {}
        for i, name in enumerate(names):
            config = node_config(
                work, name, i, quic[name], admins[name], acq_port, key, fsync, servers,
                f"replicas = {len(servers)}\nevents = {str(not args.no_events).lower()}\n"
                f"shared_velocity = {str(not args.no_shared_velocity).lower()}\n")
            switches[name] = spawn([BIN, "serve", "--config", config], f"switch-{name}.log")
            wait_ready(admins[name])
        time.sleep(1.0)
        watched = {f"switch-{n}": proc for n, proc in switches.items()}
        watched["acquirer"] = acquirer
        watched.update({f"nats{i}": proc for i, proc in enumerate(nats)})
        record = os.path.join(work, "record.jsonl")
        targets = ",".join(f"127.0.0.1:{quic[n]}" for n in names)

        def sample():
            for n, proc in switches.items():
                rss[n] = max(rss.get(n, 0), rss_mib(proc.pid))
                try:
                    lag[n] = max(lag[n], (stats(admins[n]).get("cluster") or {}).get("follow_lag", 0))
                except Exception:
                    pass

        load = spawn([BIN, "load", "--target", targets, "--rate", str(args.rate),
                      "--duration", f"{args.duration}s", "--connections", str(args.connections),
                      "--record", record, "--json", os.path.join(work, "load.json"), "--quiet",
                      "--max-outstanding", "50000"] + (["--pipelined"] if args.pipelined else []),
                     "load.log")
        cpu = cpu_while(load, watched, sample)
        finals = {n: stats(admins[n]) for n in names}
    finally:
        stop(procs)

    report = json.load(open(os.path.join(work, "load.json")))
    lines = [json.loads(line) for line in open(record)]
    codes = {}
    for line in lines:
        codes[line["code"]] = codes.get(line["code"], 0) + 1
    latencies = sorted(line["latency_us"] for line in lines)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] / 1000
    fmt = lambda s: f"{s.get('p50_us', 0) / 1000:.2f} / {s.get('p99_us', 0) / 1000:.2f} ms"
    answered = len(lines)
    shape = "pipelined" if args.pipelined else "one stream per request"
    print(f"mode {args.mode}, {args.nodes} node(s): {args.rate} TPS for {args.duration} s, {shape}, "
          f"{args.connections} connections; work dir {work}")
    print(f"sent {report.get('sent')}, answered {answered}, codes {json.dumps(codes, sort_keys=True)}, "
          f"approvals {codes.get('00', 0) / args.duration:.0f}/s")
    for n in names:
        stage = {e["stage"]: e.get("since_start") or {} for e in finals[n].get("stages", [])}
        print(f"node {n}: journal stage p50 / p99: {fmt(stage.get('journal', {}))}; "
              f"switch's own: {fmt(stage.get('switch', {}))}; total: {fmt(stage.get('total', {}))}; "
              f"peak RSS {rss.get(n, 0):.0f} MiB; follower lag at most {lag[n]} messages")
    if latencies:
        print(f"gateway p50 / p99: {p(0.5):.2f} / {p(0.99):.2f} ms")
    total_cpu = sum(cpu.values())
    per_auth = total_cpu / answered * 1e6 if answered else 0
    print("CPU seconds while the load ran: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f"; all together {per_auth:.0f} µs per authorization "
          f"(switches {sum(v for k, v in cpu.items() if k.startswith('switch')) / max(answered, 1) * 1e6:.0f} µs)")


def rss_mib(pid):
    """Resident memory of a process, MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
