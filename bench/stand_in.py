#!/usr/bin/env python3
"""Stand-in processing over real processes: one acquirer simulator, the switch with a
stand-in rule on its only route, and an open-loop load, each its own process. While the
load runs the acquirer is killed (kill -9), and started again on the same port a while
later; the switch stands in meanwhile and owes it the advices.

    python3 bench/stand_in.py [--rate 2000] [--duration 20] [--at 6] [--down 6] [--max-amount 10000] [--pan-key]

Prints the answers by code, how many were approved in stand-in (the journal's
`advice_queued` records, each the stand-in answer and the advice owed) during the outage, and the acquirer's books once it is back: the
advices it booked (0120/0121 lines of its ledger, by RRN and STAN) against the stand-in
approvals the gateways were told of. Every stand-in approval must be booked once, under
one STAN, and nothing else; exits 1 otherwise.

Needs the release binary: cargo build --release --bin payswitch.
"""

import argparse
import collections
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
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--at", type=float, default=6.0, help="seconds into the load")
    p.add_argument("--down", type=float, default=6.0, help="seconds the acquirer is gone")
    p.add_argument("--max-amount", type=int, default=10000, help="stand-in limit, minor units")
    p.add_argument("--pan-key", action="store_true",
                   help="seal PANs in the journal (journal.pan_key_file): advices carry field 2")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="payswitch-stand-in-")
    north_port, quic_port = free_port(), free_port()
    admin = f"127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    config = os.path.join(work, "switch.toml")
    pan_key_line = ""
    if args.pan_key:
        key_file = os.path.join(work, "keys", "pan-data.key")
        os.makedirs(os.path.dirname(key_file), mode=0o700)
        subprocess.run([BIN, "journal", "new-pan-key", key_file], check=True,
                       capture_output=True)
        pan_key_line = f'pan_key_file = "{key_file}"'
    with open(config, "w") as f:
        f.write(f"""
insecure_acquirers = true
[listen]
quic = "127.0.0.1:{quic_port}"
admin = "{admin}"
[journal]
dir = "{os.path.join(work, 'journal')}"
fsync = "never"
{pan_key_line}
[[acquirers]]
name = "north"
address = "127.0.0.1:{north_port}"
timeout_ms = 2000
[[routes]]
acquirers = ["north"]
stand_in = {{ max_amount_minor = {args.max_amount} }}
""")
    procs = []

    # Appends: the acquirer is started twice with one log.
    spawn = spawner(work, procs, "a")

    ledger = os.path.join(work, "ledger.jsonl")
    north_cmd = [BIN, "acquirer-sim", "--listen", f"127.0.0.1:{north_port}", "--name", "north",
                 "--approval-rate", "1", "--ledger", ledger]
    try:
        north = spawn(north_cmd, "north.log")
        switch = spawn([BIN, "serve", "--config", config], "switch.log")
        wait_ready(admin)
        time.sleep(1.0)  # the link up
        record = os.path.join(work, "record.jsonl")
        load = spawn([BIN, "load", "--target", f"127.0.0.1:{quic_port}", "--rate",
                      str(args.rate), "--duration", f"{args.duration}s", "--connections", "8",
                      "--record", record, "--json", os.path.join(work, "load.json"),
                      "--quiet"], "load.log")
        time.sleep(args.at)
        fault_ms = int(time.time() * 1000)
        north.send_signal(signal.SIGKILL)
        north.wait()
        time.sleep(args.down)
        back_ms = int(time.time() * 1000)
        north = spawn(north_cmd, "north.log")
        drained_ms = None
        while load.poll() is None:  # the link back up and every advice owed so far booked
            now = stats(admin)
            up = all(a.get("state") == "up" and a.get("breaker") == "closed"
                     for a in now.get("acquirers", []))
            if up and now.get("stand_in", {}).get("advices_pending", 1) == 0:
                drained_ms = int(time.time() * 1000)
                break
            time.sleep(0.1)
        load.wait(timeout=args.duration + 60)
        deadline = time.time() + 60
        while True:  # the advices drain
            final = stats(admin)
            if final.get("stand_in", {}).get("advices_pending", 0) == 0 or time.time() > deadline:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # the ledger flushes
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
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    lines = [json.loads(line) for line in open(record)]
    told = {(l["terminal"], l["rrn"]): l for l in lines}
    codes = collections.Counter(l["code"] for l in lines)
    # Which approvals the switch gave in stand-in: its journal says (the `advice_queued`
    # record is the stand-in answer); an acquirer's approval code may start with S too.
    export = subprocess.run([BIN, "journal", "export", os.path.join(work, "journal")],
                            check=True, capture_output=True, text=True).stdout
    journal = [json.loads(line) for line in export.splitlines()]
    stood_in = {(r["terminal"], r["rrn"]): r["approval_code"] for r in journal
                if r["kind"] == "advice_queued"}
    told_differently = [k for k, code in stood_in.items()
                        if k in told and (told[k]["code"], told[k].get("approval_code"))
                        != ("00", code)]
    outage = [l for l in lines if fault_ms <= l["intended_ms"] <= back_ms]
    outage_codes = collections.Counter(l["code"] for l in outage)
    books = [json.loads(line) for line in open(ledger)]
    advice_lines = [b for b in books if b["mti"] in ("0120", "0220", "0121", "0221")]
    # An acquirer books an advice once per STAN: a repeat (0121) carries the same one.
    booked = collections.defaultdict(set)
    for b in advice_lines:
        booked[(b["terminal"], b["rrn"])].add(b["stan"])
    advices = {k: len(stans) for k, stans in booked.items()}
    repeats = sum(1 for b in advice_lines if b["mti"] in ("0121", "0221"))
    with_pan = sum(1 for b in advice_lines if b.get("pan"))
    authorized_there = {(b["terminal"], b["rrn"]) for b in books if b["mti"] in ("0100", "0200")}
    print(f"stand-in up to {args.max_amount} minor units; the only acquirer killed {args.at:.0f} s "
          f"into {args.duration} s at {args.rate} TPS (8 QUIC connections), back after "
          f"{args.down:.0f} s; work dir {work}")
    print(f"answered: {len(lines)}, by code {dict(codes)}")
    print(f"scheduled while it was gone: {len(outage)}, by code {dict(outage_codes)}")
    print(f"stand-in approvals told to the gateways: {len(stood_in)}")
    if drained_ms is not None:
        print(f"from the acquirer's restart to the link up with no advice pending: "
              f"{drained_ms - back_ms} ms")
    print(f"advices booked by the acquirer: {len(advices)} RRNs, {len(advice_lines)} advice "
          f"lines of which {repeats} repeats (0121), {with_pan} with field 2")
    missing = set(stood_in) - set(advices)
    extra = set(advices) - set(stood_in)
    twice = [k for k, n in advices.items() if n > 1]
    also_authorized = set(stood_in) & authorized_there
    print(f"stand-in approvals without an advice: {len(missing)}; advices for no stand-in "
          f"approval: {len(extra)}; advised under two STANs: {len(twice)}; also authorized "
          f"there: {len(also_authorized)}; journaled but told otherwise: "
          f"{len(told_differently)}")
    print(f"switch: stand_in {json.dumps(final.get('stand_in'))}")
    if switch_cpu is not None:
        print(f"switch CPU: {switch_cpu:.1f} s, {1e6 * switch_cpu / max(len(lines), 1):.0f} us "
              f"per authorization")
    pan_wrong = args.pan_key and with_pan != len(advice_lines)
    return 1 if (missing or extra or twice or also_authorized or told_differently
                 or pan_wrong) else 0


if __name__ == "__main__":
    sys.exit(main())
