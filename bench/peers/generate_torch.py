#!/usr/bin/env python3
"""Peer of bench/generate: greedy decoding of a GPT-2-shaped model (pre-LN blocks, tanh GELU, tied head,
random weights) in PyTorch eager with a past-key-values cache, as Hugging Face's GPT2LMHeadModel decodes:
the prompt once, then one position per token attending to the cached keys and values.

Prints: peer=torch<version>-<device> ms_per_token=<float>
Usage: generate_torch.py [--device cpu|cuda] [--layers 12] [--dim 768] [--heads 12] [--vocab 50257]
                         [--prompt 16] [--new 64]
"""
import argparse, math, time
import torch, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
for k, v in (("layers", 12), ("dim", 768), ("heads", 12), ("vocab", 50257), ("prompt", 16), ("new", 64)):
    p.add_argument("--" + k, type=int, default=v)
a = p.parse_args()
torch.manual_seed(0)
dev, C, H = a.device, a.dim, a.heads
D = C // H


def w(*s):
    return (torch.randn(*s, device=dev) * 0.02)


wte, wpe = w(a.vocab, C), w(1024, C)
blocks = [dict(ln1=(torch.ones(C, device=dev), torch.zeros(C, device=dev)), qkv=(w(3 * C, C), torch.zeros(3 * C, device=dev)),
               proj=(w(C, C), torch.zeros(C, device=dev)), ln2=(torch.ones(C, device=dev), torch.zeros(C, device=dev)),
               fc=(w(4 * C, C), torch.zeros(4 * C, device=dev)), out=(w(C, 4 * C), torch.zeros(C, device=dev)))
          for _ in range(a.layers)]
lnf = (torch.ones(C, device=dev), torch.zeros(C, device=dev))


def forward(ids, past):
    B, T = ids.shape
    L = past[0][0].shape[2] if past else 0
    x = wte[ids] + wpe[L:L + T]
    new_past = []
    for i, b in enumerate(blocks):
        h = F.layer_norm(x, (C,), *b["ln1"])
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in F.linear(h, *b["qkv"]).split(C, 2))
        if past:
            k, v = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
        new_past.append((k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=not past) if hasattr(F, "scaled_dot_product_attention") \
            else torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(
                torch.ones(T, k.shape[2], dtype=torch.bool, device=dev).triu(1 + k.shape[2] - T), float("-inf")), -1) @ v
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, C), *b["proj"])
        x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), *b["ln2"]), *b["fc"]), approximate="tanh"), *b["out"])
    return F.linear(F.layer_norm(x, (C,), *lnf), wte), new_past


def generate(n):  # n new tokens: the prompt's forward, then n - 1 single positions
    ids = torch.tensor([[(i * 7919) % a.vocab for i in range(a.prompt)]], device=dev)
    logits, past = forward(ids, None)
    for _ in range(n - 1):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits, past = forward(nxt, past)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


with torch.no_grad():
    generate(2)  # warm-up
    sync()
    t0 = time.perf_counter()
    generate(a.new)
    sync()
    ms = (time.perf_counter() - t0) * 1e3 / a.new
print(f"peer=torch{torch.__version__.split('+')[0]}-{dev} ms_per_token={ms:.3f}")
