#!/usr/bin/env python3
"""A Llama-3-8B-shaped random model for the runtime's performance figures, and transformers'
own timings of it on the same GPU.

Builds LlamaForCausalLM with Llama-3-8B's widths (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, head dim 128, vocab 128256, rope llama3) and --layers layers, directly on the GPU in
bf16 (weights ~ N(0, 1/fan_in), norms 1 + 0.1 N), saves it with save_pretrained (safetensors)
to --out, then times transformers on it:
  prefill tokens/s = prompt / (wall time of one forward over the prompt, use_cache=True, logits of
                     the last position only, as generate's prefill and the runtime's)
  decode ms/token  = (t(generate prompt, new = 1 + decode) - t(generate prompt, new = 1)) / decode
with greedy generate (do_sample=False, no eos stop), torch.cuda.synchronize() around every
timing, one warm-up, the median of --repeats. Prints one JSON line.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def build(layers, out, seed):
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling=dict(LLAMA3_ROPE), bos_token_id=128000, eos_token_id=128001)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device="cuda"))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda"))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device="cuda") / p.shape[1] ** 0.5)
    model.eval()
    model.save_pretrained(out, safe_serialization=True, max_shard_size="5GB")
    return model


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def bench(model, prompt_len, decode, repeats, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).cuda()
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=True)

    def gen_new(n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    prefill, one, many = [], [], []
    for rep in range(repeats + 1):
        p = timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
        a = timed(gen_new(1))
        b = timed(gen_new(1 + decode))
        if rep:
            prefill.append(p), one.append(a), many.append(b)
    return {
        "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
        "decode_ms_per_token": (statistics.median(many) - statistics.median(one)) * 1e3 / decode,
        "prefill_s": prefill, "generate_1_s": one, f"generate_{1 + decode}_s": many,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, nargs="+", default=[512])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    t = time.perf_counter()
    model = build(args.layers, args.out, args.seed)
    built = time.perf_counter() - t
    for prompt in args.prompt:
        result = bench(model, prompt, args.decode, args.repeats, args.seed)
        result.update(backend="transformers", transformers=__import__("transformers").__version__,
                      torch=torch.__version__, attn_implementation=model.config._attn_implementation,
                      layers=args.layers, prompt=prompt, decode=args.decode, repeats=args.repeats,
                      dtype="bfloat16", gpu=torch.cuda.get_device_name(0), build_and_save_s=built)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
