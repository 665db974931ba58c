#!/usr/bin/env python3
"""Peer of bench/kernels' attention rows: PyTorch's F.scaled_dot_product_attention, forward and backward
(PyTorch < 2.0 has none: there the written-out softmax(q k^T / sqrt(D) + mask) v, peer=torch-math-<device>).

Prints: peer=torch<version>-sdpa-<device> fwd_TFLOPs=<float> bwd_TFLOPs=<float> fwd_ms=<float> bwd_ms=<float>
FLOPs as FlashAttention counts them (Dao 2023): forward 4 * B * H * T^2 * D (halved when causal),
backward 2.5x the forward. bwd_ms is (forward + backward) - forward, as bench/kernels measures ours.
Usage: sdpa_torch.py [--B 16] [--H 12] [--T 1024] [--D 64] [--dtype bf16|f16|f32] [--causal 1] [--device cuda|cpu]
       [--iters 20]
"""
import argparse, time
import torch, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--B", type=int, default=16)
p.add_argument("--H", type=int, default=12)
p.add_argument("--T", type=int, default=1024)
p.add_argument("--D", type=int, default=64)
p.add_argument("--dtype", default="bf16")
p.add_argument("--causal", type=int, default=1)
p.add_argument("--device", default="cuda")
p.add_argument("--iters", type=int, default=20)
a = p.parse_args()
dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
torch.manual_seed(0)
q, k, v, ct = (torch.randn(a.B, a.H, a.T, a.D, device=a.device, dtype=dt) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_(True)


def sync():
    if a.device == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / a.iters


if hasattr(F, "scaled_dot_product_attention"):  # PyTorch >= 2.0 (flash / memory-efficient / cuDNN kernels)
    name = "sdpa"
    attn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(a.causal))
else:  # PyTorch 1.13 (Debian 12): the written-out attention, PyTorch's own "math" SDPA backend
    name = "math"
    mask = torch.ones(a.T, a.T, dtype=torch.bool, device=a.device).triu(1) if a.causal else None

    def attn():
        s = (q @ k.transpose(-2, -1)) * (a.D ** -0.5)
        if mask is not None:
            s = s.masked_fill(mask, float("-inf"))
        return torch.softmax(s, -1) @ v

fwd = timed(attn)
both = timed(lambda: torch.autograd.grad(attn(), (q, k, v), ct))
bwd = max(both - fwd, 1e-9)
flops = 4.0 * a.B * a.H * a.T * a.T * a.D * (0.5 if a.causal else 1.0)
print(f"peer=torch{torch.__version__}-{name}-{a.device} B={a.B} H={a.H} T={a.T} D={a.D} dtype={a.dtype} causal={a.causal} "
      f"fwd_TFLOPs={flops / fwd / 1e12:.3f} bwd_TFLOPs={2.5 * flops / bwd / 1e12:.3f} "
      f"fwd_ms={fwd * 1e3:.3f} bwd_ms={bwd * 1e3:.3f}")
