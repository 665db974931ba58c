#!/usr/bin/python3
"""Numeric oracle of tests/unit/test_onnx.cpp.

An evaluator, in plain numpy, of the ONNX operators (opset 17) that the exporter emits, written
from the ONNX operator specification (https://onnx.ai/onnx/operators/) and independent of Titanax:
it uses neither onnxruntime, torch nor onnx.reference.

  python3 onnx_reference.py MODEL.onnx OUT_DIR IN0.npy [IN1.npy ...]
      checks the model, binds the graph inputs in order, evaluates the nodes and writes graph
      output k as OUT_DIR/output<k>.npy.  Exit 0 on success, 3 when onnx.checker rejects the
      model, 4 when an input's dtype or shape does not match, 5 for an operator it does not
      implement, 1 (with a traceback) for anything else.
  python3 onnx_reference.py --jobs JOBS.txt
      runs many models in one process: each line of JOBS.txt is one command line as above
      (tab-separated); job k's exit code is written to OUT_DIR/rc, its error message (if any)
      to OUT_DIR/error.txt. Exit 0 once every job ran.
  python3 onnx_reference.py --self-test

Run it with /usr/bin/python3, whose python3-onnx (1.12) provides `onnx`.
"""
import contextlib
import functools
import io
import math
import os
import sys
import traceback

import numpy as np
import onnx
from onnx import helper, mapping, numpy_helper


class Unsupported(Exception):
    """An operator, or an operator form, this evaluator does not implement."""


class InputMismatch(Exception):
    """A bound input whose dtype or shape differs from the model's declaration."""


def _np_dtype(elem_type):
    return np.dtype(mapping.TENSOR_TYPE_TO_NP_TYPE[elem_type])


def _like(r, x):
    """r as an array of x's dtype (undoes numpy's promotions)."""
    return np.asarray(r, dtype=x.dtype)


def _ints(t):
    return None if t is None else [int(v) for v in np.asarray(t).reshape(-1)]


def _ew(fn, keep=True):
    """An elementwise operator; keep=True casts the result back to the first input's dtype."""
    return lambda i, a, n: _like(fn(*i), i[0]) if keep else np.asarray(fn(*i))


# ---- elementwise -------------------------------------------------------------------------------
def clip(i, a, n):
    x, lo, hi = (i + [None, None])[:3]
    r = x if lo is None else np.maximum(x, lo)
    return _like(r if hi is None else np.minimum(r, hi), x)


# ---- reductions --------------------------------------------------------------------------------
def _axes(x, axes):
    return tuple(range(x.ndim)) if not axes else tuple(int(v) % x.ndim for v in axes)


def _reduce(fn):
    """A reduction whose axes are an attribute (opset < 18); absent axes reduce everything."""
    return lambda i, a, n: _like(fn(i[0], _axes(i[0], a.get("axes")), bool(a.get("keepdims", 1))),
                                 i[0])


def _logsumexp(x, ax, kd):
    m = np.max(x, axis=ax, keepdims=True)
    r = np.log(np.sum(np.exp(x - m), axis=ax, keepdims=True)) + m
    return r if kd else np.squeeze(r, axis=ax)


def reduce_sum(i, a, n):
    x, axes = i[0], _ints(i[1] if len(i) > 1 else None)
    if not axes and a.get("noop_with_empty_axes", 0):
        return x.copy()
    return np.sum(x, axis=_axes(x, axes), keepdims=bool(a.get("keepdims", 1)), dtype=x.dtype)


def argmax(i, a, n):
    x, axis = i[0], a.get("axis", 0) % i[0].ndim
    if a.get("select_last_index", 0):
        r = x.shape[axis] - 1 - np.argmax(np.flip(x, axis), axis=axis)
    else:
        r = np.argmax(x, axis=axis)
    return (np.expand_dims(r, axis) if a.get("keepdims", 1) else r).astype(np.int64)


# ---- linear algebra ----------------------------------------------------------------------------
def gemm(i, a, n):
    A, B = i[0], i[1]
    A, B = (A.T if a.get("transA", 0) else A), (B.T if a.get("transB", 0) else B)
    r = a.get("alpha", 1.0) * (A @ B)
    if len(i) > 2 and i[2] is not None:
        r = r + a.get("beta", 1.0) * i[2]
    return _like(r, A)


# ---- shape and data movement -------------------------------------------------------------------
def reshape(i, a, n):
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[k] if s == 0 else s for k, s in enumerate(shape)]
    return x.reshape(shape)


def expand(i, a, n):
    x = i[0]
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(_ints(i[1])))).copy()


def _slice_axis(start, end, step, dim):
    """The spec's clamping of one axis of Slice, as a Python slice with no negative bounds."""
    start, end = start + dim if start < 0 else start, end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, None if end < 0 else end, step)


def one_hot(i, a, n):
    """OneHot: indices (negative ones count from the end), depth, values [off, on]; out-of-range
    indices give a row of `off`."""
    idx, depth, values = i[0].astype(np.int64), int(np.asarray(i[1]).reshape(-1)[0]), i[2]
    idx = np.where(idx < 0, idx + depth, idx)
    axis = a.get("axis", -1)
    hot = idx[..., None] == np.arange(depth)
    out = np.where(hot, values[1], values[0]).astype(values.dtype)
    return np.moveaxis(out, -1, axis if axis >= 0 else out.ndim + axis)


def pad(i, a, n):
    """Pad (opset 13+): pads input [x1_begin, ..., xk_begin, x1_end, ..., xk_end]; constant mode only."""
    if a.get("mode", b"constant") not in (b"constant", "constant"):
        raise Unsupported(f"Pad mode {a['mode']}")
    x, pads = i[0], [int(p) for p in i[1]]
    value = i[2].item() if len(i) > 2 and i[2] is not None else 0
    k = x.ndim
    if any(p < 0 for p in pads):
        raise Unsupported("Pad with negative pads")
    return np.pad(x, [(pads[d], pads[k + d]) for d in range(k)], constant_values=value)


def slice_(i, a, n):
    x, starts, ends = i[0], _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax % x.ndim] = _slice_axis(s, e, st, x.shape[ax % x.ndim])
    return x[tuple(index)].copy()


def split(i, a, n):
    x, axis = i[0], a.get("axis", 0) % i[0].ndim
    sizes = _ints(i[1]) if len(i) > 1 and i[1] is not None else None
    if sizes is None:
        if x.shape[axis] % n:
            raise ValueError(f"Split: dimension {x.shape[axis]} is not divisible into {n} parts")
        sizes = [x.shape[axis] // n] * n
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def squeeze(i, a, n):
    x, axes = i[0], _ints(i[1] if len(i) > 1 else None)
    return np.squeeze(x, axis=None if axes is None else tuple(v % x.ndim for v in axes))


def unsqueeze(i, a, n):
    x, axes = i[0], _ints(i[1])
    return np.expand_dims(x, tuple(v % (x.ndim + len(axes)) for v in axes))


def gather(i, a, n):
    x, idx, axis = i[0], i[1], a.get("axis", 0) % i[0].ndim
    return np.take(x, np.where(idx < 0, idx + x.shape[axis], idx), axis=axis)


def constant(i, a, n):
    if "value" in a:
        return numpy_helper.to_array(a["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.array(a[key], dtype=dtype)
    raise Unsupported(f"Constant with attribute {sorted(a)}")


# ---- normalisation -----------------------------------------------------------------------------
def softmax(i, a, n):
    x, ax = i[0], a.get("axis", -1)
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    return _like(e / np.sum(e, axis=ax, keepdims=True), x)


def log_softmax(i, a, n):
    x, ax = i[0], a.get("axis", -1)
    d = x - np.max(x, axis=ax, keepdims=True)
    return _like(d - np.log(np.sum(np.exp(d), axis=ax, keepdims=True)), x)


def layer_norm(i, a, n):
    x, scale, bias = (i + [None])[:3]
    stash = _np_dtype(a.get("stash_type", onnx.TensorProto.FLOAT))
    cdt = np.promote_types(x.dtype, stash)
    axes = tuple(range(a.get("axis", -1) % x.ndim, x.ndim))
    xc = x.astype(cdt)
    mean = np.mean(xc, axis=axes, keepdims=True)
    d = xc - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    inv = _like(1.0 / np.sqrt(var + a.get("epsilon", 1e-5)), xc)
    y = d * inv * scale
    y = _like(y if bias is None else y + bias, x)
    return [y, mean.astype(stash), inv.astype(stash)][:n]


# ---- convolution and pooling (2-D, NCHW) -------------------------------------------------------
def _out_size(size, k, s, d, pads, ceil_mode):
    span = size + pads[0] + pads[1] - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # with ceil_mode, the last window must start inside the input or the begin padding
    return out - 1 if ceil_mode and (out - 1) * s >= size + pads[0] else out


def _geometry(op, x, a, kernel):
    """Kernel, strides, dilations, (begin, end) pads and output size of each spatial axis; the end
    pads grow so that every window (ceil_mode) lies inside the padded input."""
    if x.ndim != 4:
        raise Unsupported(f"{op} on a rank-{x.ndim} input (only 2-D NCHW)")
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise Unsupported(f"{op} with auto_pad={a['auto_pad']!r}")
    k, s = list(a.get("kernel_shape", kernel)), list(a.get("strides", [1, 1]))
    d, p = list(a.get("dilations", [1, 1])), list(a.get("pads", [0, 0, 0, 0]))
    pads = [(p[0], p[2]), (p[1], p[3])]
    out = [_out_size(x.shape[2 + j], k[j], s[j], d[j], pads[j], a.get("ceil_mode", 0))
           for j in (0, 1)]
    pads = [(b, max(e, (o - 1) * st + dl * (kk - 1) + 1 - size - b))
            for (b, e), o, st, dl, kk, size in zip(pads, out, s, d, k, x.shape[2:])]
    return k, s, d, pads, out


def _taps(xp, k, s, d, out):
    """For each kernel offset (p, q): the padded input under it, at every output position."""
    for p in range(k[0]):
        for q in range(k[1]):
            yield (p, q), xp[..., p * d[0]:p * d[0] + s[0] * (out[0] - 1) + 1:s[0],
                             q * d[1]:q * d[1] + s[1] * (out[1] - 1) + 1:s[1]]


def conv(i, a, n):
    x, w, b = (i + [None])[:3]
    k, s, d, pads, out = _geometry("Conv", x, a, w.shape[2:])
    g, (N, C), M = a.get("group", 1), x.shape[:2], w.shape[0]
    xp = np.pad(x, ((0, 0), (0, 0), *pads))
    xg, wg = xp.reshape(N, g, C // g, *xp.shape[2:]), w.reshape(g, M // g, C // g, *k)
    y = sum(np.einsum("ngchw,gmc->ngmhw", t, wg[..., p, q])
            for (p, q), t in _taps(xg, k, s, d, out)).reshape(N, M, *out)
    return _like(y if b is None else y + b.reshape(1, M, 1, 1), x)


def max_pool(i, a, n):
    if n > 1:
        raise Unsupported("MaxPool with an Indices output")
    x = i[0]
    k, s, d, pads, out = _geometry("MaxPool", x, a, None)
    low = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    xp = np.pad(x, ((0, 0), (0, 0), *pads), constant_values=low)
    return functools.reduce(np.maximum, (t for _, t in _taps(xp, k, s, d, out))).copy()


OPS = {
    "Add": _ew(np.add), "Sub": _ew(np.subtract), "Mul": _ew(np.multiply), "Div": _ew(np.divide),
    "Pow": _ew(np.power),
    "Max": _ew(lambda *xs: functools.reduce(np.maximum, xs)),
    "Min": _ew(lambda *xs: functools.reduce(np.minimum, xs)),
    "Equal": _ew(np.equal, False), "Less": _ew(np.less, False), "Greater": _ew(np.greater, False),
    "LessOrEqual": _ew(np.less_equal, False), "GreaterOrEqual": _ew(np.greater_equal, False),
    "Not": _ew(np.logical_not, False), "And": _ew(np.logical_and, False),
    "Neg": _ew(np.negative), "Exp": _ew(np.exp), "Log": _ew(np.log), "Sqrt": _ew(np.sqrt),
    "Reciprocal": _ew(np.reciprocal), "Tanh": _ew(np.tanh), "Abs": _ew(np.abs),
    "Sign": _ew(np.sign),
    "Sigmoid": _ew(lambda x: 1.0 / (1.0 + np.exp(-x))), "Relu": _ew(lambda x: np.maximum(x, 0)),
    "Erf": _ew(np.vectorize(math.erf, otypes=[np.float64])),
    "Where": _ew(np.where, False), "Identity": _ew(np.copy),
    "Clip": clip, "Cast": lambda i, a, n: i[0].astype(_np_dtype(a["to"])),
    "ReduceSum": reduce_sum,
    "ReduceMax": _reduce(lambda x, ax, kd: np.max(x, axis=ax, keepdims=kd)),
    "ReduceMin": _reduce(lambda x, ax, kd: np.min(x, axis=ax, keepdims=kd)),
    "ReduceMean": _reduce(lambda x, ax, kd: np.mean(x, axis=ax, keepdims=kd)),
    "ReduceSumSquare": _reduce(lambda x, ax, kd: np.sum(x * x, axis=ax, keepdims=kd)),
    "ReduceLogSumExp": _reduce(_logsumexp),
    "ArgMax": argmax,
    "MatMul": _ew(np.matmul), "Gemm": gemm,
    "Transpose": lambda i, a, n: np.transpose(i[0], a.get("perm")).copy(),
    "Reshape": reshape, "Expand": expand, "Slice": slice_,
    "Concat": lambda i, a, n: np.concatenate(i, axis=a["axis"]), "Pad": pad, "OneHot": one_hot,
    "Split": split, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Gather": gather,
    "Shape": lambda i, a, n: np.array(i[0].shape[a.get("start", 0):a.get("end")], dtype=np.int64),
    "Constant": constant,
    "Softmax": softmax, "LogSoftmax": log_softmax, "LayerNormalization": layer_norm,
    "Conv": conv, "MaxPool": max_pool,
}


def _check_input(vi, value):
    t = vi.type.tensor_type
    want = _np_dtype(t.elem_type)
    if value.dtype != want:
        raise InputMismatch(f"input '{vi.name}': dtype {value.dtype}, the model declares {want}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if t.HasField("shape") and (len(dims) != value.ndim or
                                any(d is not None and d != s for d, s in zip(dims, value.shape))):
        raise InputMismatch(f"input '{vi.name}': shape {list(value.shape)}, the model declares "
                            f"{['?' if d is None else d for d in dims]}")


def evaluate(model, inputs):
    """The graph outputs of `model` for the arrays `inputs`, bound to its inputs in order."""
    g = model.graph
    env = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    free = [vi for vi in g.input if vi.name not in env]
    if len(free) != len(inputs):
        raise InputMismatch(f"the model has {len(free)} inputs, {len(inputs)} arrays were given")
    for vi, value in zip(free, inputs):
        _check_input(vi, value)
        env[vi.name] = value
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            raise Unsupported(f"{node.domain or 'ai.onnx'}::{node.op_type}")
        attrs = {at.name: helper.get_attribute_value(at) for at in node.attribute}
        ins = [env[x] if x else None for x in node.input]
        outs = OPS[node.op_type](ins, attrs, len(node.output))
        outs = outs if isinstance(outs, list) else [outs]
        for name, value in zip(node.output, outs):
            if name:
                env[name] = np.asarray(value)
    return [env[vi.name] for vi in g.output]


def run_jobs(jobs_path):
    with open(jobs_path) as f:
        jobs = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    for argv in jobs:
        os.makedirs(argv[1], exist_ok=True)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(argv)
        with open(os.path.join(argv[1], "error.txt"), "w") as f:
            f.write(err.getvalue())
        with open(os.path.join(argv[1], "rc"), "w") as f:
            f.write(f"{rc}\n")
    return 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    model_path, out_dir = argv[0], argv[1]
    try:
        model = onnx.load(model_path)
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:  # the checker raises several exception types
            print(f"onnx.checker rejected {model_path}: {e}", file=sys.stderr)
            return 3
        outputs = evaluate(model, [np.load(p) for p in argv[2:]])
        os.makedirs(out_dir, exist_ok=True)
        for k, value in enumerate(outputs):
            np.save(os.path.join(out_dir, f"output{k}.npy"), value)
        return 0
    except InputMismatch as e:
        print(f"input mismatch: {e}", file=sys.stderr)
        return 4
    except Unsupported as e:
        print(f"unsupported operator: {e}", file=sys.stderr)
        return 5
    except Exception:
        traceback.print_exc()
        return 1


def _self_test():
    rng = np.random.default_rng(0)
    i64 = lambda *v: np.array(v, dtype=np.int64)
    passed = []

    def run(op, inputs, inits=(), rank=None, n_out=1, **attrs):
        """The outputs of a one-node model (inputs x<k>, initializers c<k>, outputs y<k>), checked
        to have the first input's dtype and, by default, its rank."""
        elem = mapping.NP_TYPE_TO_TENSOR_TYPE[inputs[0].dtype]
        ins = [helper.make_tensor_value_info(f"x{k}", elem, v.shape) for k, v in enumerate(inputs)]
        dims = [f"d{d}" for d in range(inputs[0].ndim if rank is None else rank)]
        outs = [helper.make_tensor_value_info(f"y{k}", elem, dims) for k in range(n_out)]
        node = helper.make_node(op, [v.name for v in ins] + [f"c{k}" for k in range(len(inits))],
                                [v.name for v in outs], **attrs)
        inits = [numpy_helper.from_array(v, f"c{k}") for k, v in enumerate(inits)]
        model = helper.make_model(helper.make_graph([node], "t", ins, outs, inits),
                                  opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model, full_check=True)
        ys = evaluate(model, list(inputs))
        assert all(y.dtype == inputs[0].dtype for y in ys), f"{op}: {[y.dtype for y in ys]}"
        return ys

    def same(name, got, want, tol=1e-5):
        if got.shape != np.shape(want) or not np.allclose(got, want, rtol=tol, atol=tol):
            raise AssertionError(f"{name}: got {got.shape}\n{got}\nwant {np.shape(want)}\n{want}")
        passed.append(name)

    # Conv: stride 2, asymmetric pads, bias, against a direct nested loop.
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    (y,) = run("Conv", [x], [w, b], strides=[2, 2], pads=[1, 0, 2, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    want = np.zeros((2, 4, (7 + 3 - 3) // 2 + 1, (6 + 1 - 2) // 2 + 1))
    for n_, m, r, c in np.ndindex(*want.shape):
        want[n_, m, r, c] = b[m] + sum(float(xp[n_, ch, 2 * r + p, 2 * c + q] * w[m, ch, p, q])
                                       for ch in range(3) for p in range(3) for q in range(2))
    same("Conv stride 2 pads bias", y, want, 1e-4)
    # Depthwise Conv with dilation: each channel convolved with its own kernel.
    w = rng.standard_normal((3, 1, 2, 2)).astype(np.float32)
    (y,) = run("Conv", [x], [w], group=3, dilations=[2, 1])
    want = np.zeros((2, 3, 5, 5))
    for n_, ch, r, c in np.ndindex(*want.shape):
        want[n_, ch, r, c] = sum(x[n_, ch, r + 2 * p, c + q] * w[ch, 0, p, q]
                                 for p in range(2) for q in range(2))
    same("Conv depthwise dilated", y, want, 1e-4)
    # MaxPool with pads and stride, against a nested loop over the unpadded input.
    (y,) = run("MaxPool", [x], kernel_shape=[3, 2], strides=[2, 1], pads=[1, 1, 1, 0])
    want = np.zeros((2, 3, 4, 6))
    for n_, ch, r, c in np.ndindex(*want.shape):
        want[n_, ch, r, c] = max(x[n_, ch, 2 * r + p - 1, c + q - 1]
                                 for p in range(3) for q in range(2)
                                 if 0 <= 2 * r + p - 1 < 7 and 0 <= c + q - 1 < 6)
    same("MaxPool pads", y, want)
    # Slice: negative starts/ends with step 2, and a reversed axis with a very negative end.
    s = rng.standard_normal((9, 8, 5)).astype(np.float32)
    (y,) = run("Slice", [s], [i64(-8, -1), i64(-1, -2**63), i64(0, 1), i64(2, -2)])
    same("Slice negative, step 2", y, s[-8:-1:2, ::-2])
    # LayerNormalization (float64) over the last two axes, against the formula.
    x, sc, bi = (rng.standard_normal(shape) for shape in ((2, 3, 4), (3, 4), (3, 4)))
    (y,) = run("LayerNormalization", [x], [sc, bi], axis=1, epsilon=1e-3)
    eps = float(np.float32(1e-3))  # a float attribute is stored as float32
    mu, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    same("LayerNormalization", y, (x - mu) / np.sqrt(var + eps) * sc + bi, 1e-12)
    # Reshape with 0 (copy the dimension) and -1 (inferred).
    (y,) = run("Reshape", [s], [i64(0, -1, 2, 5)], rank=4)
    same("Reshape 0 and -1", y, s.reshape(9, 4, 2, 5))
    # Split into 3 equal outputs along axis 1.
    for k, y in enumerate(run("Split", [s[:, :6]], n_out=3, axis=1)):
        same(f"Split part {k}", y, s[:, 2 * k:2 * k + 2])
    # Softmax along axis 1 of a 3-D tensor.
    (y,) = run("Softmax", [s], axis=1)
    same("Softmax axis 1", y, np.exp(s) / np.exp(s).sum(axis=1, keepdims=True))
    # Gather with negative indices along axis 1.
    (y,) = run("Gather", [s], [i64(-1, 0, -8)], axis=1)
    same("Gather negative indices", y, s[:, [7, 0, 0]])
    # Erf keeps float32.
    (y,) = run("Erf", [s])
    same("Erf", y, np.vectorize(math.erf)(s.astype(np.float64)))
    print(f"self-test: {len(passed)} cases passed")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        _self_test()
        sys.exit(0)
    if len(sys.argv) == 3 and sys.argv[1] == "--jobs":
        sys.exit(run_jobs(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
