#!/usr/bin/env bash
# promtool: the alert rules parse, the configuration is valid (with its credentials file
# pointed at a temporary one, since /etc/prometheus is not ours here) and every alert fires
# in the rule unit tests.
#   check_prometheus.sh REPO_ROOT
set -euo pipefail
root=$1
if ! command -v promtool >/dev/null; then
  echo "FAIL promtool not found (Debian package prometheus; ./deploy/install_deps.sh installs it)" >&2
  exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$root"/deploy/prometheus/*.yml "$work/"
echo "sk-test" >"$work/api-key"
sed -i "s|credentials_file: .*|credentials_file: $work/api-key|" "$work/prometheus.yml"
promtool check rules "$work/alerts.yml"
promtool check config "$work/prometheus.yml"
(cd "$work" && promtool test rules alerts_test.yml)
# Every alert in alerts.yml has a test case in which it fires.
python3 - "$work" <<'PY'
import sys, yaml
work = sys.argv[1]
alerts = {r["alert"] for g in yaml.safe_load(open(f"{work}/alerts.yml"))["groups"] for r in g["rules"]}
fired = {c["alertname"] for t in yaml.safe_load(open(f"{work}/alerts_test.yml"))["tests"]
         for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
missing = sorted(alerts - fired)
if missing:
    sys.exit(f"FAIL alerts never made to fire in alerts_test.yml: {', '.join(missing)}")
PY
echo "PASS prometheus config, rules and rule unit tests"
