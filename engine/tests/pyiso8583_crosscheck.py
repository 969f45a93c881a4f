#!/usr/bin/env python3
"""The independent side of the pyiso8583 cross-check (engine/tests/pyiso8583_crosscheck.rs).

pyiso8583's `iso8583.specs.default` is the same ISO 8583:1987 layout as
shared/iso8583-fields.tsv. Messages are exchanged as JSON lines in the form of
`payswitch iso decode`: {"mti": "0100", "fields": {"2": "...", "55": "<lowercase hex>"}}.

    check-spec           compare iso8583.specs.default with the TSV given on stdin
    generate SEED COUNT  random messages over every field kind, encoded by pyiso8583:
                         one {"hex": ..., "json": ..., "mti": ..., "fields": ...} line
                         each ("json" is the expected decode line, as text)
    decode               hex lines on stdin, decoded by pyiso8583, one JSON line each
                         ({"error": ...} for a line pyiso8583 refuses)

Requires `pip install pyiso8583`.
"""

import json
import random
import sys

try:
    import iso8583
    from iso8583.specs import default as SPEC
except ImportError:
    sys.stderr.write("pyiso8583 is not installed: pip install pyiso8583\n")
    sys.exit(3)

# Field 65 is left out: the TSV (and so payswitch) has it as an 8-byte binary data field
# read in its place after field 64, while pyiso8583 4.x takes bit 65 as the indicator of a
# tertiary bitmap (fields 129-192) read right after the secondary bitmap, and drops a "65"
# value when encoding. The two cannot agree on any message carrying it.
DATA_FIELDS = [n for n in range(2, 129) if n != 65]
PRINTABLE = [chr(c) for c in range(0x20, 0x7F)]


def is_binary(number):
    return SPEC[str(number)]["data_enc"] == "b"


def to_json(doc):
    """pyiso8583's decoded document in the payswitch JSON form (bitmaps left out)."""
    fields = {}
    for number in DATA_FIELDS:
        value = doc.get(str(number))
        if value is None:
            continue
        # pyiso8583 gives binary fields as uppercase hex.
        fields[str(number)] = value.lower() if is_binary(number) else value
    return {"mti": doc["t"], "fields": fields}


def random_value(rng, number):
    spec = SPEC[str(number)]
    max_len = spec["max_len"]
    if spec["len_type"] == 0:
        length = max_len
    else:
        # The edges (empty, full) as often as the inside.
        length = rng.choice([0, max_len, rng.randint(0, max_len), rng.randint(1, 12)])
        length = min(length, max_len)
    if is_binary(number):
        return rng.randbytes(length).hex()
    return "".join(rng.choice(PRINTABLE) for _ in range(length))


def random_fields(rng, index):
    # The first 126 messages each carry one given field, so every field is covered;
    # then a mix of primary-only and primary+secondary messages.
    numbers = set(rng.sample(DATA_FIELDS, rng.randint(0, 24)))
    if index < len(DATA_FIELDS):
        numbers.add(DATA_FIELDS[index])
    elif index % 3 == 0:
        numbers = {n for n in numbers if n <= 64}
    return sorted(numbers)


def generate(seed, count):
    rng = random.Random(seed)
    for index in range(count):
        mti = "".join(rng.choice("0123456789") for _ in range(4))
        if index == count - 1:
            numbers = list(DATA_FIELDS)  # every field at once, the longest message
        else:
            numbers = random_fields(rng, index)
        doc = {"t": mti}
        for number in numbers:
            doc[str(number)] = random_value(rng, number)
        expected = {"mti": mti, "fields": {str(n): doc[str(n)] for n in numbers}}
        raw, _ = iso8583.encode(doc, SPEC)
        # "json" is the exact line `payswitch iso decode` must print for "hex".
        line = json.dumps(expected, separators=(",", ":"))
        print(json.dumps({"hex": bytes(raw).hex(), "json": line, **expected}, separators=(",", ":")))


def decode():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            doc, _ = iso8583.decode(bytes.fromhex(line), SPEC)
            out = to_json(doc)
        except Exception as error:  # reported to the Rust side, which fails the test
            out = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(out, separators=(",", ":")))


def check_spec():
    kinds = {"ascii": "ascii", "binary": "b"}
    rows = 0
    for line in sys.stdin:
        if line.startswith("#") or line.startswith("field") or not line.strip():
            continue
        number, encoding, prefix, max_len, _name = line.rstrip("\n").split("\t")
        spec = SPEC[number]
        ours = (kinds[encoding], int(prefix), int(max_len), "ascii")
        theirs = (spec["data_enc"], spec["len_type"], spec["max_len"], spec["len_enc"])
        if ours != theirs:
            print(f"field {number}: TSV {ours}, pyiso8583 {theirs}")
            sys.exit(1)
        rows += 1
    print(f"{rows} rows match")


def main(argv):
    if argv[1:2] == ["generate"] and len(argv) == 4:
        generate(int(argv[2]), int(argv[3]))
    elif argv[1:] == ["decode"]:
        decode()
    elif argv[1:] == ["check-spec"]:
        check_spec()
    else:
        sys.stderr.write(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv)
