#!/usr/bin/env python3
"""Trains needle-llama: a small Llama (transformers LlamaForCausalLM) with the runtime's byte
tokenizer, on needle_data.py documents of at most --ctx tokens, for a fixed wall-clock
budget on one GPU in bf16 autocast; then evaluates answer accuracy in torch at several
lengths (the training length and past it) and saves the checkpoint in Hugging Face format
with the byte tokenizer file the runtime reads (unshackle_tokenizer.json).

    python3 tools/train_needle/train.py --out OUT_DIR [--minutes 5.5] [--seed 1234]

The loss is next-token cross entropy over the whole document plus, with weight
--answer-weight, the mean cross entropy of the answer tokens alone: the answers are a few
bytes per document and would otherwise be drowned by the filler.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import needle_data as nd  # noqa: E402


class Stream(torch.utils.data.IterableDataset):
    """Endless batches; worker w draws from random.Random(seed * 1000 + w)."""

    def __init__(self, seed, batch, ctx):
        self.seed, self.batch, self.ctx = seed, batch, ctx

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(self.seed * 1000 + (info.id if info else 0))
        while True:
            x = torch.full((self.batch, self.ctx), nd.PAD, dtype=torch.long)
            y = torch.full((self.batch, self.ctx), -100, dtype=torch.long)
            a = torch.zeros((self.batch, self.ctx), dtype=torch.bool)
            for b in range(self.batch):
                tokens, mask = nd.training_example(rng, self.ctx)
                n = len(tokens)
                x[b, :n] = torch.tensor(tokens)
                y[b, :n - 1] = torch.tensor(tokens[1:])
                a[b, :n - 1] = torch.tensor(mask[1:], dtype=torch.bool)
            yield x, y, a


def evaluate(model, device, lengths, n_needles, trials, seed):
    """Teacher-forced exact match of the answer (equal to greedy decoding getting every
    answer byte right, since greedy feeds back its own argmax)."""
    model.eval()
    rows = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for length in lengths:
            for n in n_needles:
                rng = random.Random(seed + 7919 * length + n)
                correct = 0
                for _ in range(trials):
                    prompt, answer, _, _ = nd.make_document(rng, length - 1, n, 1 if n == 1 else 2)
                    p, a = nd.encode(prompt), nd.encode(answer)
                    ids = torch.tensor([[nd.BOS] + p + a], device=device)
                    logits = model(ids).logits[0]
                    pred = logits[len(p): len(p) + len(a)].argmax(-1).tolist()
                    correct += int(pred == a)
                rows.append({"length": length, "needles": n, "asked": 1 if n == 1 else 2, "trials": trials,
                             "accuracy": correct / trials})
                print(f"eval length {length:6d} needles {n} asked {rows[-1]['asked']}: "
                      f"{correct}/{trials}", flush=True)
    model.train()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--answer-weight", type=float, default=2.0)
    ap.add_argument("--minutes", type=float, default=5.5, help="training wall-clock budget")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--eval-trials", type=int, default=100)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = "cuda"
    config = LlamaConfig(vocab_size=nd.VOCAB, hidden_size=args.hidden, intermediate_size=(8 * args.hidden // 3 + 7) // 8 * 8,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                         max_position_embeddings=args.ctx, rope_theta=args.rope_theta, rms_norm_eps=1e-5,
                         bos_token_id=nd.BOS, eos_token_id=nd.EOS, pad_token_id=nd.PAD,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M; args {vars(args)}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    loader = torch.utils.data.DataLoader(Stream(args.seed, args.batch, args.ctx), batch_size=None,
                                         num_workers=args.workers, pin_memory=True, prefetch_factor=4)
    budget = args.minutes * 60
    warmup = 200
    t0 = time.time()
    step = 0
    log = []
    for x, y, a in loader:
        elapsed = time.time() - t0
        if elapsed > budget:
            break
        # Warm-up by steps, then cosine by elapsed time to 10% of the peak.
        frac = min(elapsed / budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, a = x.to(device, non_blocking=True), y.to(device, non_blocking=True), a.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).logits.float()
        ce = F.cross_entropy(logits.view(-1, nd.VOCAB), y.view(-1), ignore_index=-100, reduction="none").view(y.shape)
        valid = (y != -100)
        lm_loss = ce[valid].mean()
        ans_loss = ce[a].mean()
        loss = lm_loss + args.answer_weight * ans_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                ans_acc = (logits.argmax(-1) == y)[a].float().mean().item()
            rec = {"step": step, "seconds": round(elapsed, 1), "lr": lr, "lm_loss": lm_loss.item(),
                   "answer_loss": ans_loss.item(), "answer_token_acc": ans_acc}
            log.append(rec)
            print(json.dumps(rec), flush=True)
        step += 1
    train_seconds = time.time() - t0
    print(f"trained {step} steps in {train_seconds:.0f} s ({step * args.batch * args.ctx / train_seconds:.0f} "
          f"token slots/s)", flush=True)

    rows = evaluate(model, device, [args.ctx // 4, args.ctx // 2, args.ctx, 2 * args.ctx, 4 * args.ctx], [1, 3],
                    args.eval_trials, seed=10_000_000 + args.seed)

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "unshackle_tokenizer.json"), "w") as f:
        json.dump({"type": "bytes", "specials": ["<s>", "</s>", "<unk>"], "bos_index": 0}, f)
    with open(os.path.join(args.out, "train_result.json"), "w") as f:
        json.dump({"args": vars(args), "params": n_params, "steps": step, "train_seconds": train_seconds,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "eval_teacher_forced_exact_match": rows, "log": log}, f, indent=1)
    print("saved", sorted(os.listdir(args.out)), flush=True)


if __name__ == "__main__":
    main()
