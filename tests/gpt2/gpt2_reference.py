#!/usr/bin/env python3
"""GPT-2 in NumPy, written from the Hugging Face GPT-2 definitions (transformers' modeling_gpt2.py:
Conv1D y = x W + b with W [in, out], pre-LN blocks, gelu_new, layer-norm eps 1e-5, tied head) and
llm.c's checkpoint layout (train_gpt2.py's write_model), for tests/unit/test_gpt_pretrained.cpp.
It shares no code with Titanax: files are written and read here with NumPy alone.

  make  --out DIR --vocab V --padded-vocab Vp --layers L --heads H --dim C --positions P --seq T --batch B --seed S
        writes random GPT-2 weights as
          hf.safetensors      Hugging Face names, F32, with the causal-mask buffers h.<i>.attn.bias
          hf_f16.safetensors  the same under "transformer.", F16, with a tied lm_head.weight
          llmc.bin            llm.c version 3 (f32), the weights of hf.safetensors, vocabulary padded to Vp
                              with random rows (never read by a correct loader)
          llmc_bf16.bin       llm.c version 5 (bf16, the f32 weights rounded to nearest even)
          peft/               a PEFT LoRA adapter of rank 3, lora_alpha 6, on target_modules ["c_attn", "c_proj"]
                              (PEFT's suffix match: attn.c_attn, attn.c_proj and mlp.c_proj), with random
                              lora_A and lora_B, for the weights of hf.safetensors
        and ids.npy (int64 [B, T]) with logits_f32.npy, logits_f16.npy, logits_bf16.npy: float64 [B, T, V]
        of those ids under each set of weights, and logits_peft.npy under hf.safetensors with the adapter.
  check --model-dir DIR --ids IDS --logits LOGITS [--adapter-dir ADIR]
        reads DIR/model.safetensors and DIR/config.json (as GPT2LMHeadModel.from_pretrained would) and
        exits 1 unless the forward of IDS matches LOGITS (float64) to 1e-9 relative to max |logit|. With
        ADIR, first applies the PEFT LoRA adapter there (adapter_config.json, adapter_model.safetensors,
        as PeftModel.from_pretrained and merge_and_unload would: each target Conv1D weight [in, out] gains
        (lora_alpha / r) (lora_B.weight @ lora_A.weight)^T, peft's fan_in_fan_out transpose).
  greedy --weights FILE --tokenizer DIR --heads H --layers L --seq T --prompt TEXT -n N
        encodes TEXT with GPT-2's tokenizer in DIR (vocab.json, merges.txt; gpt2_bpe_reference.py's
        encoder), appends up to N argmax tokens of the safetensors weights in FILE (the window of the last
        T ids; stopping after <|endoftext|>, which is not printed) and prints the text, as `titanax sample
        --temperature 0` does. Exits 2 when two logits come within 1e-3 of each other (a near tie that
        float32 rounding could decide either way).
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def write_safetensors(path, tensors, metadata=None):
    header, offset, blobs = {}, 0, []
    if metadata:
        header["__metadata__"] = metadata
    for name, (array, dtype) in tensors.items():
        data = np.ascontiguousarray(array.astype(DTYPES[dtype])).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[b:end], dtype=DTYPES[e["dtype"]]).reshape(e["shape"]).astype(np.float64)
    return out, meta


def to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns, rounded to nearest even (no NaNs here)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w + b


def gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def forward(w, ids, heads, layers):
    """Logits [B, T, V] of GPT2LMHeadModel with weights w (Hugging Face names, float64)."""
    B, T = ids.shape
    x = w["wte.weight"][ids] + w["wpe.weight"][:T]
    C = x.shape[-1]
    D = C // heads
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    for i in range(layers):
        p = "h.%d." % i
        a = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"])
        qkv = a @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (qkv[..., j * C:(j + 1) * C].reshape(B, T, heads, D).transpose(0, 2, 1, 3) for j in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
        s = np.where(mask, -np.inf, s)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        y = (s @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        m = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        x = x + gelu_new(m @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]) @ w[p + "mlp.c_proj.weight"] \
            + w[p + "mlp.c_proj.bias"]
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"])
    return x @ w["wte.weight"].T


def make(a):
    rng = np.random.default_rng(a.seed)
    V, Vp, L, C, P = a.vocab, a.padded_vocab, a.layers, a.dim, a.positions

    def mat(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {"wte.weight": mat(V, C), "wpe.weight": mat(P, C)}
    for i in range(L):
        p = "h.%d." % i
        for ln in ("ln_1", "ln_2"):
            w[p + ln + ".weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
            w[p + ln + ".bias"] = mat(C) / 2
        for name, fan_in, fan_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, 4 * C),
                                      ("mlp.c_proj", 4 * C, C)):
            w[p + name + ".weight"] = mat(fan_in, fan_out)
            w[p + name + ".bias"] = mat(fan_out) / 2
    w["ln_f.weight"] = (1 + 0.1 * rng.standard_normal(C)).astype(np.float32)
    w["ln_f.bias"] = mat(C) / 2
    ids = rng.integers(0, V, size=(a.batch, a.seq)).astype(np.int64)
    np.save(a.out + "/ids.npy", ids)

    hf = {}
    for name, t in w.items():
        hf[name] = (t, "F32")
        if name.endswith("ln_1.weight"):  # the causal-mask buffer transformers keeps in older files
            hf[name.replace("ln_1.weight", "attn.bias")] = (np.tril(np.ones((P, P), np.float32))[None, None], "F32")
    write_safetensors(a.out + "/hf.safetensors", hf, {"format": "pt"})
    np.save(a.out + "/logits_f32.npy", forward({k: v.astype(np.float64) for k, v in w.items()}, ids, a.heads, L))

    half = {k: v.astype(np.float16) for k, v in w.items()}
    tensors = {"transformer." + k: (v, "F16") for k, v in half.items()}
    tensors["lm_head.weight"] = (half["wte.weight"], "F16")
    write_safetensors(a.out + "/hf_f16.safetensors", tensors, {"format": "pt"})
    np.save(a.out + "/logits_f16.npy", forward({k: v.astype(np.float64) for k, v in half.items()}, ids, a.heads, L))

    # llm.c: [out, in] weights (the transpose of Conv1D's), each stacked over the layers, in write_model's order.
    def stack(suffix, transpose=False):
        return np.stack([w["h.%d.%s" % (i, suffix)].T if transpose else w["h.%d.%s" % (i, suffix)] for i in range(L)])

    wte = np.concatenate([w["wte.weight"], mat(Vp - V, C) * 50])  # padding rows: garbage a loader must drop
    params = [wte, w["wpe.weight"], stack("ln_1.weight"), stack("ln_1.bias"), stack("attn.c_attn.weight", True),
              stack("attn.c_attn.bias"), stack("attn.c_proj.weight", True), stack("attn.c_proj.bias"),
              stack("ln_2.weight"), stack("ln_2.bias"), stack("mlp.c_fc.weight", True), stack("mlp.c_fc.bias"),
              stack("mlp.c_proj.weight", True), stack("mlp.c_proj.bias"), w["ln_f.weight"], w["ln_f.bias"]]
    for name, version in (("llmc.bin", 3), ("llmc_bf16.bin", 5)):
        header = np.zeros(256, dtype=np.int32)
        header[:8] = [20240326, version, P, V, L, a.heads, C, Vp]
        with open(a.out + "/" + name, "wb") as f:
            f.write(header.tobytes())
            for t in params:
                t = np.ascontiguousarray(t, dtype=np.float32)
                f.write(t.tobytes() if version == 3 else to_bf16_bits(t).tobytes())
    rounded = {k: from_bf16_bits(to_bf16_bits(v)).astype(np.float64) for k, v in w.items()}
    np.save(a.out + "/logits_bf16.npy", forward(rounded, ids, a.heads, L))

    # A PEFT adapter as PeftModel.save_pretrained writes one for GPT2LMHeadModel (adapter name "default"
    # dropped from the keys); lora_A [r, in], lora_B [out, r] of each Conv1D module a target matches.
    r = 3
    os.makedirs(a.out + "/peft", exist_ok=True)
    with open(a.out + "/peft/adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 6, "lora_dropout": 0.05,
                   "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "bias": "none",
                   "base_model_name_or_path": "gpt2"}, f)
    lora = {}
    for i in range(L):
        for name, fan_in, fan_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_proj", 4 * C, C)):
            p = "base_model.model.transformer.h.%d.%s." % (i, name)
            lora[p + "lora_A.weight"] = (mat(r, fan_in), "F32")
            lora[p + "lora_B.weight"] = (mat(fan_out, r), "F32")
    write_safetensors(a.out + "/peft/adapter_model.safetensors", lora, {"format": "pt"})
    adapted = {k: v.astype(np.float64) for k, v in w.items()}
    assert not apply_peft_adapter(adapted, a.out + "/peft", L)
    np.save(a.out + "/logits_peft.npy", forward(adapted, ids, a.heads, L))


def check(a):
    w, meta = read_safetensors(a.model_dir + "/model.safetensors")
    with open(a.model_dir + "/config.json") as f:
        cfg = json.load(f)
    problems = []
    if meta.get("format") != "pt":
        problems.append("metadata format is %r, transformers needs 'pt'" % meta.get("format"))
    if cfg.get("model_type") != "gpt2" or cfg.get("activation_function") != "gelu_new":
        problems.append("config.json is not a gelu_new gpt2: %r" % cfg)
    if cfg["vocab_size"] != w["wte.weight"].shape[0] or cfg["n_embd"] != w["wte.weight"].shape[1]:
        problems.append("config.json's sizes differ from wte.weight's %r" % (w["wte.weight"].shape,))
    if a.adapter_dir:
        problems += apply_peft_adapter(w, a.adapter_dir, cfg["n_layer"])
    ids = np.load(a.ids)
    want = np.load(a.logits)
    got = forward(w, ids, cfg["n_head"], cfg["n_layer"])
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    if not err <= 1e-9:
        problems.append("logits differ: max relative error %.3g" % err)
    for p in problems:
        print(p)
    return 1 if problems else 0


def apply_peft_adapter(w, adir, layers):
    """Merges the PEFT LoRA adapter in folder adir into the GPT-2 weights w; returns the problems found."""
    with open(adir + "/adapter_config.json") as f:
        cfg = json.load(f)
    lora, _ = read_safetensors(adir + "/adapter_model.safetensors")
    problems = []
    if cfg.get("peft_type") != "LORA" or cfg.get("fan_in_fan_out") is not True or cfg.get("bias") != "none":
        problems.append("adapter_config.json is not a fan_in_fan_out LORA adapter without biases: %r" % cfg)
    r, scale = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    used = set()
    # PEFT's target_modules match a module whose name is the target or ends with "." + target.
    modules = [m for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
               if any(m == t or m.endswith("." + t) for t in cfg["target_modules"])]
    for i in range(layers):
        for module in modules:
            p = "base_model.model.transformer.h.%d.%s." % (i, module)
            A, B = lora[p + "lora_A.weight"], lora[p + "lora_B.weight"]
            W = w["h.%d.%s.weight" % (i, module)]
            if A.shape != (r, W.shape[0]) or B.shape != (W.shape[1], r):
                problems.append("%s: lora_A %r, lora_B %r for a Conv1D weight %r" % (p, A.shape, B.shape, W.shape))
                continue
            w["h.%d.%s.weight" % (i, module)] = W + scale * (B @ A).T
            used.update((p + "lora_A.weight", p + "lora_B.weight"))
    if used != set(lora):
        problems.append("adapter tensors no target module uses: %r" % sorted(set(lora) - used))
    return problems


def greedy(a):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpt2_bpe_reference as bpe
    encoder, ranks = bpe.load(a.tokenizer)
    prompt = bpe.encode(a.prompt, encoder, ranks)
    w, _ = read_safetensors(a.weights)
    ids = list(prompt)
    for _ in range(a.n):
        logits = forward(w, np.array([ids[-a.seq:]]), a.heads, a.layers)[0, -1]
        top = np.sort(logits)[-2:]
        if top[1] - top[0] < 1e-3:
            print("near tie: %.6g vs %.6g" % (top[1], top[0]), file=sys.stderr)
            return 2
        ids.append(int(np.argmax(logits)))
        if ids[-1] == encoder[bpe.EOT]:
            ids.pop()
            break
    sys.stdout.buffer.write(a.prompt.encode() + bpe.decode(ids, encoder)[len(bpe.decode(prompt, encoder)):] + b"\n")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["make", "check", "greedy"])
    ap.add_argument("--weights")
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompt")
    ap.add_argument("-n", type=int)
    ap.add_argument("--out")
    ap.add_argument("--model-dir")
    ap.add_argument("--ids")
    ap.add_argument("--logits")
    ap.add_argument("--adapter-dir")
    for k in ("vocab", "padded-vocab", "layers", "heads", "dim", "positions", "seq", "batch", "seed"):
        ap.add_argument("--" + k, type=int)
    a = ap.parse_args()
    if a.mode == "make":
        make(a)
        return 0
    return check(a) if a.mode == "check" else greedy(a)


if __name__ == "__main__":
    sys.exit(main())
