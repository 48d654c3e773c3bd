#!/usr/bin/env python3
"""Needle retrieval accuracy of `unshackle generate` across attention modes and lengths.

Documents come from tools/train_needle/needle_data.py (the distribution needle-llama was
trained on, at 512 tokens), made longer: a single fact at several depths (NeedleBench-style
single needle) and three facts of which two are asked (multi-needle, Counting-Stars-style
"list what you found"). Each trial runs `unshackle generate --json` (greedy) as a separate
process and is correct when the five-digit codes of the answer, in order, are exactly the
expected ones.

    python3 bench/accuracy/run_accuracy.py --unshackle BUILD/tools/unshackle \
        --results bench/accuracy/results/cpu.jsonl [--plan cpu]

Results are appended one JSON line per trial, and trials already in the file are skipped,
so an interrupted run resumes. bench/accuracy/make_table.py turns the file into the table of
docs/accuracy.md. Compression weights are made by bench/accuracy/calibrate.sh.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tools", "train_needle"))
import needle_data as nd  # noqa: E402
import random  # noqa: E402

L_I, L_L = 16, 256
COMP = os.path.join(HERE, "compression", "needle-llama-d{}-w256.safetensors")


def mode_args(name):
    """Command-line settings of each named configuration. ESA attends l_I + top_k + l_L = 400
    tokens of the past; streaming gets the same budget as a window."""
    base = ["--l-i", str(L_I), "--l-l", str(L_L)]
    table = {
        "full": ["--mode", "full"],
        "streaming": ["--mode", "streaming", "--l-i", str(L_I), "--l-l", str(L_L + 128)],
        "block": ["--mode", "block", *base, "--top-k", "128", "--block", "16", "--compression", COMP.format(16)],
        "exact-topk": ["--mode", "exact-topk", *base, "--top-k", "128"],
        "esa": ["--mode", "esa", *base, "--top-k", "128", "--compression", COMP.format(16)],
        "esa-k32": ["--mode", "esa", *base, "--top-k", "32", "--compression", COMP.format(16)],
        "esa-d8": ["--mode", "esa", *base, "--top-k", "128", "--compression", COMP.format(8)],
        "esa-d32": ["--mode", "esa", *base, "--top-k", "128", "--compression", COMP.format(32)],
        "esa+lagkv": ["--mode", "esa", *base, "--top-k", "128", "--compression", COMP.format(16), "--lag", "64",
                      "--lag-ratio", "0.5"],
    }
    return table[name]


ALL = ["full", "streaming", "block", "exact-topk", "esa", "esa-k32", "esa-d8", "esa-d32", "esa+lagkv"]
LONG = ["streaming", "block", "esa", "esa+lagkv"]


def plan_cpu():
    """(length, needles, asked, depths, seed, mode, ranks) in priority order: short lengths
    first, then the long ones with fewer trials (2-core CPU)."""
    jobs = []
    single3 = [0.1, 0.5, 0.9]
    for length in (512, 2048):
        for mode in ALL:
            for i, depth in enumerate(single3):
                jobs.append((length, 1, 1, [depth], 100 + i, mode, 1))
            for i in range(3):
                jobs.append((length, 3, 2, None, 200 + i, mode, 1))
    # Distributed path: the same trials on 2 and 3 in-process ranks.
    for ranks in (2, 3):
        for mode in ("esa", "esa+lagkv"):
            for i, depth in enumerate(single3):
                jobs.append((2048, 1, 1, [depth], 100 + i, mode, ranks))
            jobs.append((2048, 3, 2, None, 200, mode, ranks))
    jobs.append((32768, 1, 1, [0.5], 101, "esa", 1))
    for mode in LONG:
        for i, depth in enumerate(single3):
            jobs.append((8192, 1, 1, [depth], 100 + i, mode, 1))
    for mode in ("exact-topk", "esa-k32", "esa-d8", "full"):
        jobs.append((8192, 1, 1, [0.5], 101, mode, 1))
    jobs.append((8192, 3, 2, None, 200, "esa", 1))
    for mode in ("streaming", "block", "esa+lagkv"):
        jobs.append((32768, 1, 1, [0.5], 101, mode, 1))
    jobs.append((32768, 1, 1, [0.1], 100, "esa", 1))
    jobs.append((32768, 1, 1, [0.9], 102, "esa", 1))
    return jobs


def plan_extra():
    """More trials where they are cheap: random depths at 1x and 4x, every mode."""
    jobs = []
    for length in (2048, 512):
        for seed in range(300, 305):
            for mode in ALL:
                jobs.append((length, 1, 1, None, seed, mode, 1))
        for seed in range(400, 403):
            for mode in ALL:
                jobs.append((length, 3, 2, None, seed, mode, 1))
    return jobs


def plan_extra8k():
    """A few more 16x trials at random depths for the modes that run there quickly."""
    jobs = [(8192, 3, 2, None, seed, "esa", 1) for seed in (400, 401)]
    for seed in (300, 301, 302):
        for mode in ("esa", "block", "esa+lagkv", "streaming"):
            jobs.append((8192, 1, 1, None, seed, mode, 1))
    return jobs


def plan_extra32k():
    """More 64x trials (random depths; about 3 minutes each for esa on 2 CPU cores), then
    one 128x esa trial (about four times longer)."""
    jobs = [(32768, 1, 1, None, seed, "esa", 1) for seed in (300, 301, 302)]
    jobs += [(32768, 3, 2, None, seed, "esa", 1) for seed in (400, 401)]
    jobs += [(32768, 1, 1, None, seed, "esa+lagkv", 1) for seed in (300, 301)]
    jobs += [(32768, 1, 1, None, 300, mode, 1) for mode in ("block", "streaming")]
    jobs.append((65536, 1, 1, [0.5], 101, "esa", 1))
    return jobs


def plan_extra64k():
    """128x on the CPU: esa at the other two fixed depths, esa+lagkv, streaming as the
    control, then one multi-needle esa and one block trial (about 10 minutes per esa trial on
    2 cores)."""
    jobs = [(65536, 1, 1, [depth], seed, "esa", 1) for depth, seed in ((0.1, 100), (0.9, 102))]
    jobs.append((65536, 1, 1, [0.5], 101, "streaming", 1))
    jobs.append((65536, 1, 1, [0.5], 101, "esa+lagkv", 1))
    jobs.append((65536, 3, 2, None, 400, "esa", 1))
    jobs.append((65536, 1, 1, [0.5], 101, "block", 1))
    return jobs


def plan_gpu():
    """One H200 through --backend cuda: ESA from 64x to 2048x the training length."""
    jobs = []
    for length in (32768, 131072, 1048576):
        jobs.append((length, 1, 1, [0.5], 101, "esa", 1))
    jobs.append((131072, 1, 1, [0.5], 101, "streaming", 1))
    jobs.append((1048576, 1, 1, [0.2], 100, "esa", 1))
    jobs.append((1048576, 3, 2, None, 200, "esa", 1))
    return jobs


def document(length, needles, asked, depths, seed):
    rng = random.Random(seed * 1_000_003 + length * 31 + needles)
    prompt, _, keys, codes = nd.make_document(rng, length - 2, needles, asked, depths)
    return prompt, keys, codes


def key_of(job):
    length, needles, asked, depths, seed, mode, ranks = job
    return f"{length}|{needles}|{asked}|{depths}|{seed}|{mode}|{ranks}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--unshackle", required=True)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "needle-llama"))
    ap.add_argument("--results", required=True)
    ap.add_argument("--plan", default="cpu", choices=["cpu", "extra", "extra8k", "extra32k", "extra64k", "gpu"])
    ap.add_argument("--timeout", type=float, default=0, help="seconds per trial (0: none)")
    ap.add_argument("--max-jobs", type=int, default=0, help="stop after this many new trials (0: all)")
    ap.add_argument("--extra", default="", help="more generate arguments for every trial (e.g. '--backend cuda')")
    args = ap.parse_args()

    done = set()
    if os.path.exists(args.results):
        with open(args.results) as f:
            done = {json.loads(line)["key"] for line in f if line.strip()}
    plans = {"cpu": plan_cpu, "extra": plan_extra, "extra8k": plan_extra8k, "extra32k": plan_extra32k, "extra64k": plan_extra64k, "gpu": plan_gpu}
    jobs = [j for j in plans[args.plan]() if key_of(j) not in done]
    print(f"{len(jobs)} trials to run ({len(done)} already in {args.results})", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    ran = 0
    for job in jobs:
        if args.max_jobs and ran >= args.max_jobs:
            break
        length, needles, asked, depths, seed, mode, ranks = job
        prompt, keys, codes = document(length, needles, asked, depths, seed)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(prompt)
            path = f.name
        cmd = [args.unshackle, "generate", "--model", args.model, "--prompt-file", path, "--max-tokens", "16",
               "--json", "--ranks", str(ranks), *mode_args(mode), *args.extra.split()]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout or None)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, -1, "", f"timed out after {args.timeout:.0f} s")
        seconds = time.time() - t0
        os.unlink(path)
        if proc.returncode != 0:
            rec = {"error": proc.stderr.strip()[-500:]}
            text, prompt_tokens = None, None
        else:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            text, prompt_tokens = out["text"], len(out["prompt_tokens"])
            rec = {}
        got = re.findall(r"\d{5}", text or "")
        rec.update({"key": key_of(job), "length": length, "prompt_tokens": prompt_tokens, "needles": needles,
                    "asked": asked, "depths": depths, "seed": seed, "mode": mode, "ranks": ranks,
                    "args": " ".join(mode_args(mode)), "expected": codes, "text": text,
                    "correct": got == codes, "seconds": round(seconds, 1)})
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        ran += 1
        print(f"{length:6d} n{needles}a{asked} {str(depths):6s} {mode:11s} P={ranks} "
              f"{'OK ' if rec['correct'] else 'bad'} {text!r} vs {codes} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
