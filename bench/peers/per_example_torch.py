#!/usr/bin/env python3
"""Peer of bench/per_example: per-example gradients with torch.func (vmap of grad over a functional call;
functorch's make_functional / vmap / grad on PyTorch 1.13), the way Opacus' functorch mode and the
PyTorch per-sample-gradients tutorial compute them. The same model and shapes as ours: the MNIST CNN
(conv3x3 1->32, ReLU, maxpool 2, conv3x3 32->64, ReLU, maxpool 2, Linear 3136->128, ReLU, Linear 128->10) or
the MLP (784-512-512-10), f32, B examples: per example the loss, every gradient and the clipping factor
min(1, C / |g|).

Prints: peer=torch<version>-func-<device> B=<batch> ms=<float per batch>
(peer=unavailable when this PyTorch has neither torch.func nor functorch.)
Usage: per_example_torch.py [--model cnn|mlp] [--B 64] [--device cpu|cuda] [--iters 10]
"""
import argparse, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--model", default="cnn")
p.add_argument("--B", type=int, default=64)
p.add_argument("--device", default="cpu")
p.add_argument("--iters", type=int, default=10)
a = p.parse_args()
torch.manual_seed(0)
dev = a.device
if a.model == "cnn":
    m = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)).to(dev)
    X = torch.rand(a.B, 1, 28, 28, device=dev)
else:
    m = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)
    X = torch.rand(a.B, 784, device=dev)
Y = torch.randint(0, 10, (a.B,), device=dev)
clip = 1.0

try:
    from torch.func import functional_call, grad_and_value, vmap
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss_of(params, x, y):
        return F.cross_entropy(functional_call(m, params, (x.unsqueeze(0),)), y.unsqueeze(0))
    name = "func"
except ImportError:
    try:
        from functorch import grad_and_value, make_functional, vmap
    except ImportError:
        print(f"peer=unavailable torch={torch.__version__}")
        raise SystemExit(0)
    fm, params = make_functional(m)
    params = tuple(p.detach() for p in params)

    def loss_of(params, x, y):
        return F.cross_entropy(fm(params, x.unsqueeze(0)), y.unsqueeze(0))
    name = "functorch"


def per_example(params, x, y):
    g, loss = grad_and_value(loss_of)(params, x, y)
    leaves = list(g.values()) if isinstance(g, dict) else list(g)
    norm = torch.sqrt(sum((t * t).sum() for t in leaves))
    return loss, g, torch.clamp(clip / norm, max=1.0)


f = vmap(per_example, in_dims=(None, 0, 0))
for _ in range(2):
    f(params, X, Y)
if dev == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(a.iters):
    out = f(params, X, Y)
if dev == "cuda":
    torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / a.iters
print(f"peer=torch{torch.__version__.split('+')[0]}-{name}-{dev} B={a.B} ms={dt * 1e3:.2f}")
