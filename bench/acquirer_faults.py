#!/usr/bin/env python3
"""Acquirer faults over real processes: two acquirer simulators, the switch routing every
card to the first and falling over to the second, and an open-loop load, each its own
process. While the load runs, the first acquirer is either killed (kill -9) or stalled
(SIGSTOP: it answers nothing until SIGCONT, then everything late).

    python3 bench/acquirer_faults.py --fault kill  [--rate 2000] [--duration 20]
    python3 bench/acquirer_faults.py --fault stall [--rate 2000] [--duration 20] [--stall 6]

Prints the share of 91 over the run, the 91s around the fault, and the failover time:
from the fault to the last request (by its scheduled send time) answered 91 before the
switch answered every request again. With --fault stall it also reads the switch's
/api/stats after the acquirer is back: reversals queued and acknowledged.

Needs the release binary: cargo build --release --bin payswitch.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from procs import BIN, free_port, spawner, stats, wait_ready



def main():
    p = argparse.ArgumentParser()
    p.add_argument("--fault", choices=["kill", "stall"], required=True)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--at", type=float, default=8.0, help="seconds into the load")
    p.add_argument("--stall", type=float, default=6.0, help="seconds stalled (SIGSTOP)")
    p.add_argument("--alone", action="store_true", help="no second acquirer: no failover")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="payswitch-faults-")
    north_port, south_port, quic_port = free_port(), free_port(), free_port()
    admin = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    procs = []

    spawn = spawner(work, procs)

    try:
        north = spawn([BIN, "acquirer-sim", "--listen", f"127.0.0.1:{north_port}",
                       "--name", "north", "--approval-rate", "1"], "north.log")
        acquirers = ["--acquirer", f"127.0.0.1:{north_port}"]
        if not args.alone:
            spawn([BIN, "acquirer-sim", "--listen", f"127.0.0.1:{south_port}",
                   "--name", "south", "--approval-rate", "1"], "south.log")
            acquirers += ["--acquirer", f"127.0.0.1:{south_port}"]
        switch = spawn([BIN, "serve", "--listen", f"127.0.0.1:{quic_port}", "--admin", admin,
                        *acquirers,
                        "--journal", os.path.join(work, "journal"), "--fsync", "never"],
                       "switch.log")
        wait_ready(admin)
        time.sleep(1.0)  # both links up
        record = os.path.join(work, "record.jsonl")
        load = spawn([BIN, "load", "--target", f"127.0.0.1:{quic_port}", "--rate",
                      str(args.rate), "--duration", f"{args.duration}s", "--connections", "8",
                      "--record", record, "--json", os.path.join(work, "load.json"),
                      "--quiet"], "load.log")
        time.sleep(args.at)
        fault_ms = int(time.time() * 1000)
        if args.fault == "kill":
            north.send_signal(signal.SIGKILL)
        else:
            north.send_signal(signal.SIGSTOP)
            time.sleep(args.stall)
            north.send_signal(signal.SIGCONT)
        load.wait(timeout=args.duration + 60)
        time.sleep(3.0)  # late answers and reversals settle
        final = stats(admin)
        switch_cpu = None
        try:
            with open(f"/proc/{switch.pid}/stat") as f:
                fields = f.read().split(")")[1].split()
                switch_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    lines = [json.loads(line) for line in open(record)]
    total = len(lines)
    failed = [l for l in lines if l["code"] == "91"]
    after = sorted((l["intended_ms"] - fault_ms, l["code"]) for l in lines)
    last_91 = max((t for t, c in after if c == "91" and t >= -2500), default=None)
    first_91 = min((t for t, c in after if c == "91" and t >= -2500), default=None)
    window = [c for t, c in after if first_91 is not None and first_91 <= t <= last_91]
    after_recovery = [c for t, c in after if t > (args.stall * 1000 + 1000)]
    if args.fault == "stall":
        print(f"scheduled more than 1 s after the stall ended: {len(after_recovery)}, "
              f"{after_recovery.count('91')} of them 91")
    print(f"fault: {args.fault} of the first acquirer {args.at:.0f} s into {args.duration} s "
          f"at {args.rate} TPS (8 QUIC connections{', no backup' if args.alone else ''}), work dir {work}")
    print(f"answered: {total}; 91: {len(failed)} ({100.0 * len(failed) / max(total, 1):.2f} %)")
    if last_91 is not None:
        print(f"91s scheduled from {first_91} ms to {last_91} ms after the fault "
              f"({len(window)} requests then, {window.count('91')} of them 91); "
              f"failover time (fault to the last 91): {last_91} ms")
    acquirers = {a["name"]: a for a in final.get("acquirers", [])}
    for name, a in acquirers.items():
        print(f"  {name}: answered {a.get('answered')}, timeouts {a.get('timeouts')}, "
              f"lost {a.get('lost')}, late {a.get('late')}, breaker {a.get('breaker')} "
              f"(opened {a.get('breaker_opened')}, refused {a.get('breaker_refused')})")
    rev = final.get("reversals", {})
    print(f"reversals: {json.dumps(rev)}")
    if switch_cpu is not None:
        print(f"switch CPU: {switch_cpu:.1f} s, {1e6 * switch_cpu / max(total, 1):.0f} us per authorization")


if __name__ == "__main__":
    sys.exit(main())
