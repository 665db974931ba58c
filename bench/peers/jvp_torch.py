#!/usr/bin/env python3
"""Peer of bench/jvp: the Jacobian-vector product of the MNIST MLP's logits (784-512-512-10, ReLU,
B=128, f32) with respect to its input and every parameter, along random tangents, by torch.func.jvp
(functorch.jvp on PyTorch 1.13): forward-mode AD with dual tensors, the same function and shapes as ours.

Prints: peer=torch<version>-<func|functorch>-<device> ms=<float per jvp>
(peer=unavailable when this PyTorch has neither torch.func nor functorch.)
Usage: jvp_torch.py [--device cpu|cuda] [--iters 10]
"""
import argparse, time
import torch, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--device", default="cpu")
p.add_argument("--iters", type=int, default=10)
a = p.parse_args()
try:
    from torch.func import jvp
    name = "func"
except ImportError:
    try:
        from functorch import jvp
        name = "functorch"
    except ImportError:
        print(f"peer=unavailable torch={torch.__version__}")
        raise SystemExit(0)
torch.manual_seed(0)
dev = a.device
sizes = [784, 512, 512, 10]
primals = [torch.rand(128, sizes[0], device=dev)]
for i, o in zip(sizes, sizes[1:]):
    bound = i ** -0.5
    primals += [(torch.rand(o, i, device=dev) * 2 - 1) * bound, (torch.rand(o, device=dev) * 2 - 1) * bound]
tangents = [torch.randn_like(t) for t in primals]


def fn(x, *wb):
    h = x
    for l in range(0, len(wb), 2):
        h = F.linear(h, wb[l], wb[l + 1])
        if l + 2 < len(wb):
            h = F.relu(h)
    return h


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


for _ in range(2):
    jvp(fn, tuple(primals), tuple(tangents))
sync()
t0 = time.perf_counter()
for _ in range(a.iters):
    jvp(fn, tuple(primals), tuple(tangents))
sync()
ms = (time.perf_counter() - t0) / a.iters * 1e3
print(f"peer=torch{torch.__version__.split('+')[0]}-{name}-{dev} ms={ms:.3f}")
