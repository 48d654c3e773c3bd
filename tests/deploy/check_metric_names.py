#!/usr/bin/env python3
"""Every metric that the Grafana dashboard and the alert rules read is one the coordinator
registers (coordinator/src/metrics.cpp), so a renamed metric fails here, not in production.
  check_metric_names.py REPO_ROOT"""
import json
import re
import sys
from pathlib import Path

import yaml

root = Path(sys.argv[1])
source = (root / "coordinator/src/metrics.cpp").read_text()
registered = set(re.findall(r'"(unshackle_[a-z0-9_]+)"', source))
histograms = set(re.findall(r'BuildHistogram\(\),\s*"(unshackle_[a-z0-9_]+)"', source))
if not registered or not histograms:
    sys.exit(f"no unshackle_ metric (or no histogram) found in {root}/coordinator/src/metrics.cpp")
exported = set(registered)
for name in histograms:
    exported |= {name + "_bucket", name + "_sum", name + "_count"}
exported.add("up")  # Prometheus's own per-target series

def metric_names(expr):
    # Label values never start with unshackle_, so every such word is a metric name.
    names = set(re.findall(r"\bunshackle_[a-zA-Z0-9_]+", expr))
    return names | ({"up"} if re.search(r"\bup\{", expr) else set())

queries = []
dashboard = json.loads((root / "deploy/grafana/unshackle.json").read_text())
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        queries.append((f"dashboard panel '{panel['title']}' {target['refId']}", target["expr"]))
rules = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
for group in rules["groups"]:
    for rule in group["rules"]:
        queries.append((f"alert {rule['alert']}", rule["expr"]))

failures = []
for where, expr in queries:
    used = metric_names(expr)
    if not used:
        failures.append(f"{where}: no unshackle_ metric found in '{expr}'")
    for name in sorted(used - exported):
        failures.append(f"{where}: '{name}' is not exported by the coordinator")
for failure in failures:
    print("FAIL", failure)
if failures:
    sys.exit(1)
print(f"PASS {len(queries)} queries use only the coordinator's {len(registered)} metrics")
