#!/usr/bin/env python3
"""Overload over real processes: an acquirer simulator, the switch and an open-loop load,
each its own process. The load offers `--rate` for `--duration` seconds, pipelined on a
few connections or one stream per request; the switch's RSS is sampled every 250 ms.

    python3 bench/overload.py --rate 6000 --duration 10 [--pipelined]

Prints what was answered, the codes, how many were shed (field 48 `shed=overload`), the
latency of the admitted requests (everything not shed) and of all, goodput (approvals a
second), and the switch's RSS at the start, peak and end.

Needs the release binary: cargo build --release --bin payswitch.
"""

import argparse
import json
import os
import socket
import sys
import tempfile
import time

from procs import BIN, cpu_while, free_port, spawner, stats, stop, wait_ready


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=int, required=True)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--pipelined", action="store_true")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--gateway-in-flight", type=int, default=None,
                   help="pipeline.max_in_flight_per_gateway (the load is one gateway)")
    p.add_argument("--pipeline", action="append", default=[], metavar="KEY=VALUE",
                   help="another [pipeline] setting of the switch, e.g. max_in_flight_per_connection=256")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="payswitch-overload-")
    acq_port, quic_port = free_port(), free_port()
    admin = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    procs = []

    spawn = spawner(work, procs)

    rss = []
    try:
        acquirer = spawn([BIN, "acquirer-sim", "--listen", f"127.0.0.1:{acq_port}", "--approval-rate", "1"],
              "acquirer.log")
        extra = []
        pipeline = list(args.pipeline)
        if args.gateway_in_flight is not None:
            pipeline.append(f"max_in_flight_per_gateway={args.gateway_in_flight}")
        if pipeline:
            config = os.path.join(work, "switch.toml")
            with open(config, "w") as f:
                f.write(f"insecure_acquirers = true\n[listen]\nquic = \"127.0.0.1:{quic_port}\"\n"
                        f"admin = \"{admin}\"\n[pipeline]\n")
                for setting in pipeline:
                    key, value = setting.split("=", 1)
                    f.write(f"{key} = {value}\n")
                f.write(f"[[acquirers]]\nname = \"sim\"\naddress = \"127.0.0.1:{acq_port}\"\n")
            extra = ["--config", config]
        switch = spawn([BIN, "serve", *extra, "--listen", f"127.0.0.1:{quic_port}", "--admin", admin,
                        "--acquirer", f"127.0.0.1:{acq_port}",
                        "--journal", os.path.join(work, "journal"), "--fsync", "never"],
                       "switch.log")
        wait_ready(admin)
        time.sleep(1.0)
        record = os.path.join(work, "record.jsonl")
        cmd = [BIN, "load", "--target", f"127.0.0.1:{quic_port}", "--rate", str(args.rate),
               "--duration", f"{args.duration}s", "--connections", str(args.connections),
               "--record", record, "--json", os.path.join(work, "load.json"), "--quiet",
               "--max-outstanding", "50000"]
        if args.pipelined:
            cmd.append("--pipelined")
        load = spawn(cmd, "load.log")
        cpu = cpu_while(load, {"switch": switch, "acquirer": acquirer},
                        sample=lambda: rss.append(rss_kib(switch.pid)))
        rss.append(rss_kib(switch.pid))
        final = stats(admin)
    finally:
        stop(procs)

    report = json.load(open(os.path.join(work, "load.json")))
    lines = [json.loads(line) for line in open(record)]
    codes = {}
    for l in lines:
        codes[l["code"]] = codes.get(l["code"], 0) + 1
    admitted = sorted(l["latency_us"] for l in lines if l["code"] != "91")
    every = sorted(l["latency_us"] for l in lines)
    approvals = codes.get("00", 0)
    rss = [r for r in rss if r is not None]
    mode = "pipelined" if args.pipelined else "one stream per request"
    print(f"offered {args.rate} TPS for {args.duration} s, {mode}, {args.connections} connections; work dir {work}")
    print(f"sent {report.get('sent')}, answered {len(lines)}, load errors {report.get('errors', report.get('failures'))}")
    print(f"codes {json.dumps(codes, sort_keys=True)}; switch shed {final.get('shed')}")
    print(f"goodput {approvals / args.duration:.0f} approvals/s")
    for name, values in (("admitted (not 91)", admitted), ("all", every)):
        if values:
            print(f"latency {name}: p50 {percentile(values, 0.5) / 1000:.1f} ms, "
                  f"p99 {percentile(values, 0.99) / 1000:.1f} ms, max {values[-1] / 1000:.1f} ms")
    stages = []
    for entry in final.get("stages", []):
        since = entry.get("since_start") or {}
        if since.get("p99_us") is not None:
            stages.append(f"{entry['stage']} {since.get('p50_us', 0) / 1000:.1f}/{since['p99_us'] / 1000:.1f}")
    if stages:
        print("switch's own stage p50/p99 in ms since start (admitted and shed): " + ", ".join(stages))
    print("CPU seconds while the load ran: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
          + f" (of {2 * args.duration} on 2 cores for {args.duration} s)")
    if rss:
        print(f"switch RSS: start {rss[0] // 1024} MiB, peak {max(rss) // 1024} MiB, end {rss[-1] // 1024} MiB")
        # Sampled every 250 ms: one in 20 is a sample every 5 s.
        print("switch RSS every 5 s (MiB): " + " ".join(str(r // 1024) for r in rss[::20]))


if __name__ == "__main__":
    sys.exit(main())
