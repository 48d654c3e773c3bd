#!/usr/bin/env python3
"""docs/settings.md lists exactly the flags each binary's --help lists, with the same
defaults (CLI11 prints a captured default as TYPE=VALUE, a required option as REQUIRED).
  check_settings_doc.py REPO_ROOT unshackle-coordinator=BIN [unshackle-worker=BIN]"""
import re
import subprocess
import sys
from pathlib import Path

root = Path(sys.argv[1])
doc = (root / "docs/settings.md").read_text()
failures = []


def doc_table(program):
    section = re.search(rf"^## {re.escape(program)}\n(.*?)(?=^## |\Z)", doc, re.S | re.M)
    if not section:
        failures.append(f"docs/settings.md: no '## {program}' section")
        return {}
    rows = {}
    for line in section.group(1).splitlines():
        match = re.match(r"\|\s*`(--[a-z0-9-]+)`\s*\|\s*([^|]*)\|", line)
        if match:
            rows[match.group(1)] = match.group(2).strip()
    return rows


def help_options(binary):
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    options = {}
    for line in text.splitlines():
        match = re.match(r"\s+(?:-\w,\s*)?(--[a-z0-9-]+)(.*)", line)
        if not match or match.group(1) == "--help":
            continue
        rest = match.group(2)
        # CLI11 2.x prints "--port UINT=8000" (older: "[8000]") and REQUIRED for required options.
        default = re.match(r"\s+[A-Z][A-Z:]*=(\S+)", rest) or re.search(r"\[([^\]]*)\]", rest)
        options[match.group(1)] = ("REQUIRED" if "REQUIRED" in rest else None, default.group(1) if default else None)
    if not options:
        sys.exit(f"{binary} --help listed no options")
    return options


for spec in sys.argv[2:]:
    program, binary = spec.split("=", 1)
    rows = doc_table(program)
    options = help_options(binary)
    for flag in sorted(set(options) - set(rows)):
        failures.append(f"docs/settings.md ({program}): {flag} is missing (it is in --help)")
    for flag in sorted(set(rows) - set(options)):
        failures.append(f"docs/settings.md ({program}): {flag} is not a flag of the binary")
    for flag in sorted(set(rows) & set(options)):
        required, default = options[flag]
        written = rows[flag]
        if required and not written.startswith("required"):
            failures.append(f"docs/settings.md ({program}): {flag} is required, the table says '{written}'")
        if default is not None and not written.startswith(f"`{default}`"):
            failures.append(f"docs/settings.md ({program}): {flag} defaults to {default}, the table says '{written}'")
    with_default = sum(1 for required, default in options.values() if default is not None)
    if with_default == 0:
        failures.append(f"{program} --help: no default could be read (has CLI11's format changed?)")
    print(f"{program}: {len(options)} flags, {with_default} defaults checked")

for failure in failures:
    print("FAIL", failure)
sys.exit(1 if failures else 0)
