#!/usr/bin/env python3
"""Where one decode token of the CUDA model goes, kernel by kernel, from an Nsight Compute CSV.

Input: `ncu --clock-control none --metrics gpu__time_duration.sum --csv --print-units base
bench_model --model M --backend cuda --prompt 64 --chunk 64 --decode 4 --repeats 1 > ncu.csv`
(tools/hf_parity/device_run.sh step 5 makes it). The last decode step is the kernels from the
last embedding gather to the end (gather -> per layer ... -> final RMSNorm -> lm_head).

Prints per kernel name: launches in that step, total microseconds, microseconds per layer; and,
given --layer-bytes (the weights one layer reads) and --ceiling-gbs (a copy ceiling measured in
the same run), the layer's time against the weight-read floor.
  python3 bench/model/ncu_decode_profile.py ncu.csv --layers 4 --layer-bytes 436207616 --ceiling-gbs 4253
"""
import argparse
import csv
import sys
from collections import OrderedDict


def read_kernels(path):
    """(name, microseconds) per profiled kernel, in launch order."""
    kernels, header = [], None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "ID":
                header = row
                continue
            if header is None or len(row) != len(header):
                continue  # ncu's own log lines before the table
            rec = dict(zip(header, row))
            if rec.get("Metric Name") != "gpu__time_duration.sum":
                continue
            ns = float(rec["Metric Value"].replace(",", ""))  # --print-units base: nanoseconds
            kernels.append((rec["Kernel Name"], ns / 1000.0))
    return kernels


def short(name):
    name = name.split("(")[0]
    for prefix in ("void ", "unshackle::"):
        name = name.removeprefix(prefix)
    return name[:70]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers of the profiled model")
    ap.add_argument("--layer-bytes", type=float, default=0, help="weight bytes one layer reads")
    ap.add_argument("--ceiling-gbs", type=float, default=0, help="copy ceiling, GB/s, same run")
    args = ap.parse_args()

    kernels = read_kernels(args.csv)
    gathers = [i for i, (n, _) in enumerate(kernels) if "gather_kernel" in n]
    if not gathers:
        sys.exit(f"{args.csv}: no gather_kernel: not a CUDA-model profile (or ncu saw no kernels)")
    step = kernels[gathers[-1]:]
    total = sum(t for _, t in step)
    by_name = OrderedDict()
    for name, t in step:
        entry = by_name.setdefault(short(name), [0, 0.0])
        entry[0] += 1
        entry[1] += t
    print(f"last decode step: {len(step)} kernels, {total:.1f} us (kernels serialized by ncu)")
    print(f"{'kernel':72s} {'launches':>8s} {'us':>9s} {'us/layer':>9s}")
    for name, (count, t) in by_name.items():
        per_layer = f"{t / args.layers:9.1f}" if count >= args.layers else f"{'-':>9s}"  # once a token
        print(f"{name:72s} {count:8d} {t:9.1f} {per_layer}")
    # Per layer: everything but the kernels that run once a token (gather, final norm, lm_head:
    # the last two kernels of the step).
    layer_us = (total - step[0][1] - step[-1][1] - step[-2][1]) / args.layers
    line = f"per layer: {layer_us:.1f} us"
    if args.layer_bytes and args.ceiling_gbs:
        floor_us = args.layer_bytes / (args.ceiling_gbs * 1e3)
        line += f"; weight-read floor {args.layer_bytes / 1e6:.1f} MB / {args.ceiling_gbs:.0f} GB/s = {floor_us:.1f} us"
        line += f" ({floor_us / layer_us:.0%} of the layer)"
    print(line)


if __name__ == "__main__":
    main()
