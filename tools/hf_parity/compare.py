#!/usr/bin/env python3
"""Compares `unshackle generate --logits-out` against a transformers reference written by
make_models.py. Logits are compared where both sides saw the same tokens: the prompt's
all-position logits, and the step logits up to the first differing token (after it the
contexts differ). Pass: relative error ||ours - ref|| / ||ref|| below the bound of the
reference kind (fp32 and bf16w: 1e-4, bf16: 1e-2) and, where tokens are required to match
(fp32, bf16w), identical tokens. bf16 reports its token agreement without failing on it:
the runtime computes in fp32, so near-ties may resolve differently from bf16 arithmetic.
Prints one line; exit 1 on failure."""
import argparse
import sys

import torch
from safetensors.torch import load_file

BOUND = {"fp32": 1e-4, "bf16w": 1e-4, "bf16": 1e-2}
TOKENS_MUST_MATCH = {"fp32": True, "bf16w": True, "bf16": False}


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--kind", required=True, choices=sorted(BOUND))
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    ours, ref = load_file(args.ours), load_file(args.reference)
    ok = True
    if not torch.equal(ours["prompt"], ref["prompt"]):
        print(f"{args.label}: FAIL prompts differ")
        return 1
    tokens_ours, tokens_ref = ours["tokens"], ref["tokens"]
    n = min(len(tokens_ours), len(tokens_ref))
    same = 0
    while same < n and tokens_ours[same] == tokens_ref[same]:
        same += 1
    prompt_err = rel(ours["prompt_logits"], ref["prompt_logits"])
    # Step i's logits were computed on prompt + tokens[:i]: comparable while tokens[:i] agree.
    steps = min(same + 1, n)
    step_err = rel(ours["step_logits"][:steps], ref["step_logits"][:steps])
    bound = BOUND[args.kind]
    ok = prompt_err < bound and step_err < bound
    tokens_equal = len(tokens_ours) == len(tokens_ref) and same == len(tokens_ref)
    if TOKENS_MUST_MATCH[args.kind] and not tokens_equal:
        ok = False
    print(f"{args.label:28s} {args.kind:6s} prompt_rel={prompt_err:.2e} step_rel={step_err:.2e} (bound {bound:.0e}, "
          f"{steps} steps) tokens {same}/{len(tokens_ref)} equal  {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
