#!/usr/bin/env python3
"""Recomputes the loss and gradients of tests/peer/gpt_dump's GPT with the PyTorch reference model.

usage: gpt_parity.py PEER_SCRIPT DIR. Exits 77 (CTest: skipped) without torch. Takes the model definition
from the reference script (everything before its training loop), loads the dumped weights (our
blocks/<i>/attn/qkv/weight [3, dim, dim] is the memory of torch's blocks.<i>.qkv.weight [3 dim, dim]),
and checks the loss (1e-6 relative) and every gradient (1e-5 relative to its largest element)."""
import sys
try:
    import numpy as np
    import torch
except ImportError:
    print("torch or numpy unavailable: skipped")
    sys.exit(77)

peer, d = sys.argv[1], sys.argv[2]
src = open(peer).read()
src = src[:src.index("torch.manual_seed(a.seed)")]
sys.argv = ["peer", "--train", "-", "--val", "-", "--vocab", "512", "--layers", "2", "--heads", "4",
            "--dim", "64", "--T", "32", "--B", "4", "--device", "cpu"]
env = {}
exec(src, env)
model = env["GPT"]()

def torch_name(p):
    p = p.replace("/", ".")
    for a, b in ((".attn.qkv", ".qkv"), (".attn.proj", ".proj"), (".mlp.fc", ".fc"), (".mlp.out", ".out")):
        p = p.replace(a, b)
    return p

names = [l.strip() for l in open(d + "/index.txt") if l.strip()]
state = model.state_dict()
assert sorted(torch_name(p) for p in names) == sorted(state), "parameter sets differ"
with torch.no_grad():
    for p in names:
        t = state[torch_name(p)]
        t.copy_(torch.from_numpy(np.fromfile(d + "/p_" + p.replace("/", "."), dtype=np.float32).reshape(t.shape)))
x = torch.from_numpy(np.fromfile(d + "/x", dtype=np.float32).astype(np.int64).reshape(4, 32))
y = torch.from_numpy(np.fromfile(d + "/y", dtype=np.float32).astype(np.int64).reshape(4, 32))
loss = model(x, y)
loss.backward()
ours = float(open(d + "/loss.txt").read())
print("torch loss %.9f, titanax loss %.9f" % (loss.item(), ours))
ok = abs(loss.item() - ours) <= 1e-6 * abs(ours)
params = dict(model.named_parameters())
worst = 0.0
for p in names:
    gt = params[torch_name(p)].grad.numpy().ravel()
    go = np.fromfile(d + "/g_" + p.replace("/", "."), dtype=np.float32)
    err = float(np.abs(gt - go).max() / max(np.abs(gt).max(), 1e-30))
    worst = max(worst, err)
    if err > 1e-5:
        print("gradient of %s differs: max relative error %.3g" % (p, err))
        ok = False
print("largest relative gradient error %.3g" % worst)
sys.exit(0 if ok else 1)
