#!/usr/bin/env python3
"""The anchor for issue 5's decode and prefill rows: PyTorch scaled_dot_product_attention
(cuDNN and FlashAttention backends) on the same shape as bench_gpu_step, in the same device run.

Shape: Llama-3-8B attention, H = 32 query heads, G = 8 KV heads, d = 128, bf16 K/V.
  decode N [distinct]: one query token through 32 layers over N keys per layer; as in
    bench_gpu_step, `distinct` layers hold distinct K/V (32 layers of 1M do not fit next to
    each other) and the 32 calls cycle over them. The group's 4 query heads are laid along the
    query axis (q [1, G, 4, d] against k, v [1, G, N, d]): identical to GQA for one token
    (no mask), and the form cuDNN and FlashAttention take without expanding K/V.
    Bytes per layer: N * G * d * 2 (K + V) * 2 B = N * 4096 B.
  prefill N: one layer, causal, q [1, H, N, d], K/V expanded to H heads before timing;
    FLOPs 4 * N^2 / 2 * H * d = 2 * d * H * N^2 (causal half), 32 layers = 32 x.
Timings: CUDA events around the whole batch of calls, median over repetitions, after warm-up.
  python3 bench/sdpa_bench.py decode 1048576 8
  python3 bench/sdpa_bench.py prefill 131072
"""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, G, D, LAYERS = 32, 8, 128, 32
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def timed_ms(fn, reps):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def decode(n, distinct):
    gen = torch.Generator(device="cuda").manual_seed(5)
    ks = [torch.randn(1, G, n, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(distinct)]
    vs = [torch.randn(1, G, n, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(distinct)]
    q = torch.randn(1, G, H // G, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    bytes_step = LAYERS * n * 4096
    print(f"sdpa decode: N={n}, 32 layer calls over {distinct} distinct K/V, q [1,{G},{H // G},{D}] bf16; "
          f"bytes/step {bytes_step / 1e9:.3f} GB")
    for name, backend in BACKENDS.items():
        def step():
            for i in range(LAYERS):
                F.scaled_dot_product_attention(q, ks[i % distinct], vs[i % distinct])
        try:
            with sdpa_kernel([backend]):
                step()
                torch.cuda.synchronize()
                med, lo, hi = timed_ms(step, 7)
            print(f"  {name:5s} 32-layer step {med:9.3f} ms (min {lo:.3f}, max {hi:.3f}; per layer {med * 1e3 / LAYERS:.1f} us) "
                  f"-> {bytes_step / (med * 1e-3) / 1e9:.0f} GB/s")
        except Exception as e:  # a backend that refuses the shape is reported, not hidden
            print(f"  {name:5s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        sys.stdout.flush()


def prefill(n, reps):
    gen = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, G, n, D, device="cuda", dtype=torch.bfloat16, generator=gen).repeat_interleave(H // G, dim=1)
    v = torch.randn(1, G, n, D, device="cuda", dtype=torch.bfloat16, generator=gen).repeat_interleave(H // G, dim=1)
    flops = 2.0 * D * H * n * n
    print(f"sdpa prefill: N={n}, one layer, causal; {flops / 1e15:.3f} PFLOP per layer (2*d*H*N^2)")
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], is_causal=True)
                torch.cuda.synchronize()
                med, lo, hi = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
            print(f"  {name:5s} one layer {med / 1e3:8.3f} s (min {lo / 1e3:.3f}) -> {flops / (med * 1e-3) / 1e12:.0f} TFLOP/s; "
                  f"32 layers {32 * med / 1e3:.2f} s")
        except Exception as e:
            print(f"  {name:5s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        sys.stdout.flush()


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}")
    what = sys.argv[1]
    n = int(sys.argv[2])
    if what == "decode":
        decode(n, int(sys.argv[3]) if len(sys.argv) > 3 else 8)
    else:
        prefill(n, int(sys.argv[3]) if len(sys.argv) > 3 else 3)
