#!/usr/bin/env python3
"""Markdown tables from run_accuracy.py's JSON lines: correct/trials per mode and length,
single needle and multi-needle separately, and the distributed check (P > 1 gives the same
generated text as P = 1 on the same trial).

    python3 bench/accuracy/make_table.py bench/accuracy/results/cpu.jsonl
"""
import json
import sys
from collections import defaultdict

ORDER = ["full", "streaming", "block", "exact-topk", "esa", "esa-k32", "esa-d8", "esa-d32", "esa+lagkv"]


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    single = [r for r in rows if r["ranks"] == 1]
    lengths = sorted({r["length"] for r in single})
    out = []
    for title, pick in (("Single needle (1 fact, asked 1; depths 0.1 / 0.5 / 0.9 of the filler, plus uniform random depths at 512, 2048 and, for some modes, 8192 and 32768)",
                         lambda r: r["needles"] == 1),
                        ("Multi-needle (3 facts, asked 2, both codes in order)", lambda r: r["needles"] == 3)):
        cells = defaultdict(lambda: [0, 0])
        secs = defaultdict(list)
        for r in single:
            if pick(r):
                c = cells[(r["mode"], r["length"])]
                c[0] += int(r["correct"])
                c[1] += 1
                secs[(r["mode"], r["length"])].append(r["seconds"])
        modes = [m for m in ORDER if any((m, L) in cells for L in lengths)]
        out.append(f"**{title}**: correct / trials (mean seconds per trial)\n")
        out.append("| mode | " + " | ".join(f"{L} ({L // 512}x)" for L in lengths) + " |")
        out.append("|---|" + "---:|" * len(lengths))
        for m in modes:
            row = []
            for L in lengths:
                if (m, L) in cells:
                    ok, n = cells[(m, L)]
                    row.append(f"{ok}/{n} ({sum(secs[(m, L)]) / n:.0f} s)")
                else:
                    row.append("not run")
            out.append(f"| {m} | " + " | ".join(row) + " |")
        out.append("")
    # Distributed path.
    base = {r["key"].rsplit("|", 1)[0]: r for r in single}
    dist = defaultdict(lambda: [0, 0, 0])
    for r in rows:
        if r["ranks"] > 1:
            ref = base.get(r["key"].rsplit("|", 1)[0])
            if ref is None:
                continue
            d = dist[(r["mode"], r["ranks"], r["length"])]
            d[0] += int(r["text"] == ref["text"])
            d[1] += 1
            d[2] += int(r["correct"])
    if dist:
        out.append("**Distributed path** (in-process ranks, `--ranks P`): trials whose generated text equals "
                   "the P = 1 text, and correct answers\n")
        out.append("| mode | P | length | same text as P = 1 | correct |")
        out.append("|---|---:|---:|---:|---:|")
        for (m, p, L), (same, n, ok) in sorted(dist.items()):
            out.append(f"| {m} | {p} | {L} | {same}/{n} | {ok}/{n} |")
        out.append("")
    errors = [r for r in rows if "error" in r]
    if errors:
        out.append(f"{len(errors)} trial(s) failed to run; first error: `{errors[0]['error'][:200]}`\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
