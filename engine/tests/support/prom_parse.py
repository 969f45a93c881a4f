"""Parses Prometheus text from stdin with the reference parser (prometheus_client) and
prints its families as JSON: {name: {"type": ..., "samples": [[name, labels, value]]}}.
Exits non-zero if the text does not parse."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    out[family.name] = {
        "type": family.type,
        "samples": [[s.name, s.labels, s.value] for s in family.samples],
    }
json.dump(out, sys.stdout)
