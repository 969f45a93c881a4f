#!/usr/bin/env python3
"""pyiso8583 decode and encode of the DESIGN.md 0100 example, for the ratio in RESULTS.md.

Same message as the criterion bench `codec/decode_0100_design_example` and
`codec/encode_0100_design_example`. Prints the median time per call over REPEATS timeit
runs (criterion also reports a median estimate). Requires `pip install pyiso8583`.

    python3 bench/pyiso8583_bench.py
"""

import statistics
import timeit

import iso8583
from iso8583.specs import default as SPEC

DESIGN_EXAMPLE = bytes.fromhex(
    "303130307220440008c0800031363431313131313131313131313131313130303030303030303030"
    "303030313235303031313235313233303435303030303031353431313035313533333031323030"
    "303030315445524d303030314d45524348414e5430303030303031383430"
)
# timeit runs of NUMBER calls each; about a second per case on a 2-core machine.
REPEATS = 15
NUMBER = 5000


def median_ns(statement):
    runs = timeit.repeat(statement, repeat=REPEATS, number=NUMBER)
    return statistics.median(runs) / NUMBER * 1e9


def main():
    decoded, _ = iso8583.decode(DESIGN_EXAMPLE, SPEC)
    encoded, _ = iso8583.encode(dict(decoded), SPEC)
    assert bytes(encoded) == DESIGN_EXAMPLE, "pyiso8583 must re-encode the example exactly"

    decode_ns = median_ns(lambda: iso8583.decode(DESIGN_EXAMPLE, SPEC))
    # encode() pops the bitmaps out of the document it is given, so each call gets a copy;
    # the copy is timed separately and subtracted.
    copy_ns = median_ns(lambda: dict(decoded))
    encode_ns = median_ns(lambda: iso8583.encode(dict(decoded), SPEC)) - copy_ns
    print(f"pyiso8583 {iso8583.__version__}, {REPEATS} x {NUMBER} calls, median per call:")
    print(f"decode_0100_design_example  {decode_ns:10.0f} ns")
    print(f"encode_0100_design_example  {encode_ns:10.0f} ns  (dict copy {copy_ns:.0f} ns subtracted)")


if __name__ == "__main__":
    main()
