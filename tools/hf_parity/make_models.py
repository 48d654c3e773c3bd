#!/usr/bin/env python3
"""Builds random-initialised Hugging Face checkpoints of every architecture the runtime
supports (save_pretrained, safetensors) and the transformers reference for each:
all-position logits of a seeded prompt and 32 greedy tokens, in fp32 and bf16.

Runs on the GPU machine (PyTorch + transformers, no internet). Writes, per case,
  OUT/<case>/<dtype>/            the checkpoint (fp32 or bf16 weights)
  OUT/<case>/<dtype>/prompt.txt  the prompt as comma-separated ids
  OUT/<case>/<dtype>/reference_<ref>.safetensors  prompt, tokens (int64), prompt_logits, step_logits (f32)
where <ref> is fp32 (fp32 weights, fp32 compute), bf16 (bf16 weights and compute) and
bf16w (bf16 weights computed in fp32: what the runtime does with bf16 weights).

Weights are not transformers' default init (std 0.02 makes logits near-uniform and greedy
tokens hinge on ties): projections get std 1/sqrt(fan_in), embeddings std 1, norms 1 + 0.1 N,
biases 0.1 N, as `unshackle make-model` does. TF32 is off so fp32 means fp32.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config)

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def cases():
    small = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=3, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    return {
        "llama2": LlamaConfig(**small, rope_theta=10000.0, rms_norm_eps=1e-6),
        "llama2-linear": LlamaConfig(**small, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "llama3": LlamaConfig(**small, rope_theta=500000.0, rms_norm_eps=1e-5, rope_scaling=dict(LLAMA3_ROPE)),
        # Llama-3-8B layer widths, 2 layers, the real vocabulary size; sharded on save.
        "llama3-8b-2l": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                    max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                                    rope_scaling=dict(LLAMA3_ROPE)),
        "mistral": MistralConfig(**small, rope_theta=10000.0, sliding_window=None, rms_norm_eps=1e-5),
        "qwen2": Qwen2Config(**small, rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False),
        "qwen2-tied": Qwen2Config(**small, rope_theta=1000000.0, rms_norm_eps=1e-6, use_sliding_window=False,
                                  tie_word_embeddings=True),
    }


def init_weights(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.1 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5
            p.copy_(value.to(p.dtype))


def prompt_ids(vocab, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


@torch.no_grad()
def reference(model, prompt, steps, device):
    """All-position logits of the prompt, then greedy decoding (argmax: ties to the lower id)
    by full recomputation (no KV cache), with the logits each token was taken from."""
    ids = torch.tensor([prompt], device=device)
    prompt_logits = model(ids).logits[0].float()
    tokens, step_logits = [], []
    logits = prompt_logits[-1]
    for _ in range(steps):
        step_logits.append(logits)
        token = int(torch.argmax(logits))
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
        logits = model(ids).logits[0, -1].float()
    return {
        "prompt": torch.tensor(prompt, dtype=torch.int64),
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "prompt_logits": prompt_logits.cpu().contiguous(),
        "step_logits": torch.stack(step_logits).cpu().contiguous(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    index = {}
    for seed, (name, config) in enumerate(cases().items(), start=1):
        if args.only and name not in args.only:
            continue
        config.architectures = [{"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                                 "Qwen2Config": "Qwen2ForCausalLM"}[type(config).__name__]]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        init_weights(model, seed)
        model.eval()
        prompt = prompt_ids(config.vocab_size, args.prompt_len, 1000 + seed)
        shard = "500MB" if name == "llama3-8b-2l" else "10GB"  # the big one also tests the index
        for dtype in ("fp32", "bf16"):
            out = os.path.join(args.out, name, dtype)
            os.makedirs(out, exist_ok=True)
            saved = model if dtype == "fp32" else model.to(torch.bfloat16)
            saved.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
            with open(os.path.join(out, "prompt.txt"), "w") as f:
                f.write(",".join(map(str, prompt)))
            refs = {"fp32": torch.float32} if dtype == "fp32" else {"bf16": torch.bfloat16, "bf16w": torch.float32}
            for ref, compute in refs.items():
                m = AutoModelForCausalLM.from_pretrained(out, dtype=compute, attn_implementation="eager")
                m.to(args.device).eval()
                save_file(reference(m, prompt, args.steps, args.device),
                          os.path.join(out, f"reference_{ref}.safetensors"))
                del m
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
                index.setdefault(name, []).append(f"{dtype}/{ref}")
            model = model.to(torch.float32)
        print(f"{name}: {index[name]}", flush=True)
        del model
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(index, f, indent=1)


if __name__ == "__main__":
    main()
