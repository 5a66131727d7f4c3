"""A reference evaluator for Core ML ML Programs: the saved MIL program, executed with torch kernels.

Core ML's own runtime (``MLModel.predict``) exists only on macOS, so on Linux a converted model could
not be checked at all. This evaluator loads the saved ``.mlpackage`` back into its MIL program (with
coremltools' milproto loader, weights included) and runs every operation in order with a torch kernel
that implements the MIL operation's documented semantics, in the program's own dtypes: an fp16
program computes in fp16, compressed weights are decompressed from their palettes or quantized
values. It is a *reference*: it checks what the program computes, not how fast or with which
accumulation order the Neural Engine or GPU computes it.

Every operation type a program uses must have a kernel here; a program with any other operation is
refused when it is loaded, naming the operations (nothing is ever skipped). ``KERNELS`` lists them;
tests/runtimes/test_mil_reference.py checks each against torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from diffship.backends.coreml import load_program
from diffship.errors import DiffshipError


class UnsupportedOpError(DiffshipError):
    """A MIL program uses an operation (or an operation variant) the reference evaluator does not implement."""


#: MIL dtype -> torch dtype; uint16 values (token ids, from iOS 17 on) are held in int32, which has
#: every uint16 value and the integer ops torch lacks for uint16.
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64, "int32": torch.int32,
           "int64": torch.int64, "int16": torch.int16, "uint16": torch.int32, "int8": torch.int8,
           "uint8": torch.uint8, "bool": torch.bool}


def torch_dtype(builtin) -> torch.dtype:
    """The torch dtype of a MIL builtin type (``types.fp16`` ...)."""
    from coremltools.converters.mil.mil import types

    return _DTYPES[types.builtin_to_string(builtin)]


class Op:
    """One operation's arguments, as torch tensors (:meth:`t`) or Python values (:meth:`v`)."""

    def __init__(self, op, env: dict[str, Any]):
        self.op = op
        self.env = env

    def has(self, name: str) -> bool:
        return self.op.inputs.get(name) is not None

    def t(self, name: str) -> torch.Tensor:
        return self.env[self.op.inputs[name].name]

    def ts(self, name: str) -> list[torch.Tensor]:
        return [self.env[v.name] for v in self.op.inputs[name]]

    def v(self, name: str, default: Any = None) -> Any:
        """A parameter as a Python value (lists for tensors); ``default`` when absent."""
        var = self.op.inputs.get(name)
        if var is None:
            return default
        if var.val is not None:
            value = var.val
        else:  # computed at run time (e.g. a reshape's shape from `shape` ops)
            value = self.env[var.name]
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, np.ndarray):
            return value.tolist()
        return value.item() if isinstance(value, np.generic) else value

    def out_dtype(self, index: int = 0) -> torch.dtype:
        return torch_dtype(self.op.outputs[index].dtype)

    def unsupported(self, what: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"the MIL reference evaluator does not implement {self.op.op_type} with {what} "
                                  f"(op {self.op.name}); report it with the model that uses it")


Kernel = Callable[[Op], Any]
KERNELS: dict[str, Kernel] = {}


def kernel(*names: str):
    def register(fn: Kernel) -> Kernel:
        for name in names:
            KERNELS[name] = fn
        return fn

    return register


# --- elementwise ------------------------------------------------------------------------------------------

_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.true_divide, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "equal": torch.eq, "not_equal": torch.ne, "less": torch.lt,
    "less_equal": torch.le, "greater": torch.gt, "greater_equal": torch.ge, "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
}
for _name, _fn in _BINARY.items():
    KERNELS[_name] = lambda a, _fn=_fn: _fn(a.t("x"), a.t("y")).to(a.out_dtype())

_UNARY = {
    "abs": torch.abs, "sqrt": torch.sqrt, "square": torch.square, "exp": torch.exp, "sin": torch.sin,
    "cos": torch.cos, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "floor": torch.floor,
    "ceil": torch.ceil, "relu": torch.relu, "silu": F.silu, "logical_not": torch.logical_not,
}
for _name, _fn in _UNARY.items():
    KERNELS[_name] = lambda a, _fn=_fn: _fn(a.t("x"))


@kernel("identity")
def _identity(a: Op) -> torch.Tensor:
    return a.t("x")


@kernel("rsqrt")
def _rsqrt(a: Op) -> torch.Tensor:
    return torch.rsqrt(a.t("x") + a.v("epsilon", 1e-12))


@kernel("inverse")
def _inverse(a: Op) -> torch.Tensor:
    return 1.0 / (a.t("x") + a.v("epsilon", 1e-4))


@kernel("log")
def _log(a: Op) -> torch.Tensor:
    return torch.log(a.t("x") + a.v("epsilon", 1e-45))


@kernel("clip")
def _clip(a: Op) -> torch.Tensor:
    return torch.clamp(a.t("x"), a.v("alpha"), a.v("beta"))


@kernel("gelu")
def _gelu(a: Op) -> torch.Tensor:
    x, mode = a.t("x"), a.v("mode", "EXACT")
    if mode == "EXACT":
        return F.gelu(x)
    if mode == "TANH_APPROXIMATION":
        return F.gelu(x, approximate="tanh")
    if mode == "SIGMOID_APPROXIMATION":
        return x * torch.sigmoid(1.702 * x)
    raise a.unsupported(f"mode {mode}")


@kernel("select")
def _select(a: Op) -> torch.Tensor:
    return torch.where(a.t("cond").bool(), a.t("a"), a.t("b"))


@kernel("cast")
def _cast(a: Op) -> torch.Tensor:
    return a.t("x").to(_DTYPES[a.v("dtype")])


# --- linear algebra and normalization ------------------------------------------------------------------


@kernel("linear")
def _linear(a: Op) -> torch.Tensor:
    return F.linear(a.t("x"), a.t("weight"), a.t("bias") if a.has("bias") else None)


@kernel("matmul")
def _matmul(a: Op) -> torch.Tensor:
    x, y = a.t("x"), a.t("y")
    if a.v("transpose_x", False) and x.ndim > 1:
        x = x.transpose(-1, -2)
    if a.v("transpose_y", False) and y.ndim > 1:
        y = y.transpose(-1, -2)
    return torch.matmul(x, y)


@kernel("einsum")
def _einsum(a: Op) -> torch.Tensor:
    return torch.einsum(a.v("equation"), *a.ts("values"))


@kernel("softmax")
def _softmax(a: Op) -> torch.Tensor:
    return torch.softmax(a.t("x"), dim=a.v("axis", -1))


@kernel("conv")
def _conv(a: Op) -> torch.Tensor:
    x, weight = a.t("x"), a.t("weight")
    spatial = x.ndim - 2
    strides = a.v("strides") or [1] * spatial
    dilations = a.v("dilations") or [1] * spatial
    pad_type = a.v("pad_type", "valid")
    if pad_type == "custom":
        pads = a.v("pad") or [0] * (2 * spatial)
    elif pad_type == "valid":
        pads = [0] * (2 * spatial)
    elif pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(x.shape[2:], weight.shape[2:], strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads += [small, large] if pad_type == "same" else [large, small]
    else:
        raise a.unsupported(f"pad_type {pad_type}")
    if any(pads):  # MIL pads are (before, after) per spatial dim in order; F.pad wants the last dim first
        x = F.pad(x, [p for i in reversed(range(spatial)) for p in (pads[2 * i], pads[2 * i + 1])])
    conv = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return conv(x, weight, a.t("bias") if a.has("bias") else None, stride=strides, dilation=dilations,
                groups=a.v("groups", 1))


def _axes(a: Op, x: torch.Tensor, name: str = "axes") -> list[int]:
    axes = a.v(name)
    return list(range(x.ndim)) if axes is None else [ax % x.ndim for ax in axes]


@kernel("layer_norm")
def _layer_norm(a: Op) -> torch.Tensor:
    x = a.t("x")
    axes = _axes(a, x)
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    out = (x - mean) / torch.sqrt(var + a.v("epsilon", 1e-5))
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]  # gamma/beta have x.shape[axes]
    if a.has("gamma"):
        out = out * a.t("gamma").reshape(shape)
    if a.has("beta"):
        out = out + a.t("beta").reshape(shape)
    return out


@kernel("instance_norm")
def _instance_norm(a: Op) -> torch.Tensor:
    x = a.t("x")
    return F.instance_norm(x, weight=a.t("gamma") if a.has("gamma") else None,
                           bias=a.t("beta") if a.has("beta") else None, eps=a.v("epsilon", 1e-5))


@kernel("batch_norm")
def _batch_norm(a: Op) -> torch.Tensor:
    return F.batch_norm(a.t("x"), a.t("mean"), a.t("variance"), weight=a.t("gamma") if a.has("gamma") else None,
                        bias=a.t("beta") if a.has("beta") else None, eps=a.v("epsilon", 1e-5))


@kernel("scaled_dot_product_attention")
def _sdpa(a: Op) -> torch.Tensor:
    mask = a.t("attn_mask") if a.has("attn_mask") else None
    return F.scaled_dot_product_attention(a.t("query"), a.t("key"), a.t("value"), attn_mask=mask)


# --- reductions ----------------------------------------------------------------------------------------

_REDUCE = {"reduce_mean": torch.mean, "reduce_sum": torch.sum, "reduce_prod": torch.prod}


def _reduce(fn):
    def run(a: Op) -> torch.Tensor:
        x = a.t("x")
        out = x
        for axis in sorted(_axes(a, x), reverse=True):
            out = fn(out, dim=axis, keepdim=True)
        return out if a.v("keep_dims", False) else out.reshape([s for i, s in enumerate(out.shape)
                                                                   if i not in _axes(a, x)])
    return run


for _name, _fn in _REDUCE.items():
    KERNELS[_name] = _reduce(_fn)
KERNELS["reduce_max"] = _reduce(lambda x, dim, keepdim: torch.amax(x, dim=dim, keepdim=keepdim))
KERNELS["reduce_min"] = _reduce(lambda x, dim, keepdim: torch.amin(x, dim=dim, keepdim=keepdim))


@kernel("reduce_argmax", "reduce_argmin")
def _argmax(a: Op) -> torch.Tensor:
    fn = torch.argmax if a.op.op_type == "reduce_argmax" else torch.argmin
    return fn(a.t("x"), dim=a.v("axis", -1), keepdim=a.v("keep_dims", False)).to(a.out_dtype())


# --- shapes, slicing and gathering ----------------------------------------------------------------------


@kernel("reshape")
def _reshape(a: Op) -> torch.Tensor:
    x, shape = a.t("x"), list(a.v("shape"))
    if len(shape) == x.ndim:  # 0 inherits the input's size at that position
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@kernel("transpose")
def _transpose(a: Op) -> torch.Tensor:
    return a.t("x").permute(a.v("perm"))


@kernel("expand_dims")
def _expand_dims(a: Op) -> torch.Tensor:
    x = a.t("x")
    rank = x.ndim + len(a.v("axes"))
    for axis in sorted(ax % rank for ax in a.v("axes")):
        x = x.unsqueeze(axis)
    return x


@kernel("squeeze")
def _squeeze(a: Op) -> torch.Tensor:
    x = a.t("x")
    axes = a.v("axes")
    if axes is None:
        return x.reshape([s for s in x.shape if s != 1])
    return x.reshape([s for i, s in enumerate(x.shape) if i not in {ax % x.ndim for ax in axes}])


@kernel("concat")
def _concat(a: Op) -> torch.Tensor:
    values, axis = a.ts("values"), a.v("axis")
    values = [v.reshape(1) if v.ndim == 0 else v for v in values]  # scalars (gathered sizes) join as 1-D
    if a.v("interleave", False):
        axis %= values[0].ndim
        stacked = torch.stack(values, dim=axis + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return torch.cat(values, dim=axis)


@kernel("stack")
def _stack(a: Op) -> torch.Tensor:
    return torch.stack(a.ts("values"), dim=a.v("axis"))


@kernel("split")
def _split(a: Op) -> tuple[torch.Tensor, ...]:
    x, axis = a.t("x"), a.v("axis")
    sizes = a.v("split_sizes")
    if sizes is None:
        n = a.v("num_splits")
        sizes = [x.shape[axis] // n] * n
    return torch.split(x, list(sizes), dim=axis)


@kernel("slice_by_index")
def _slice_by_index(a: Op) -> torch.Tensor:
    x = a.t("x")
    rank = x.ndim
    begin, end = a.v("begin"), a.v("end")
    stride = a.v("stride") or [1] * rank
    begin_mask = a.v("begin_mask") or [False] * rank
    end_mask = a.v("end_mask") or [False] * rank
    squeeze = a.v("squeeze_mask") or [False] * rank
    index = []
    for i in range(rank):
        if squeeze[i]:
            index.append(begin[i])
            continue
        index.append(slice(None if begin_mask[i] else begin[i], None if end_mask[i] else end[i], stride[i]))
    if any(s < 0 for s in stride):  # torch slicing takes no negative steps: go through numpy's view
        return torch.from_numpy(np.ascontiguousarray(x.numpy()[tuple(index)]))
    return x[tuple(index)]


@kernel("slice_by_size")
def _slice_by_size(a: Op) -> torch.Tensor:
    x = a.t("x")
    index = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(a.v("begin"), a.v("size")))
    return x[index]


@kernel("shape")
def _shape(a: Op) -> torch.Tensor:
    return torch.tensor(list(a.t("x").shape), dtype=torch.int32)


@kernel("gather")
def _gather(a: Op) -> torch.Tensor:
    x, indices = a.t("x"), a.t("indices").long()
    if a.v("batch_dims", 0):
        raise a.unsupported(f"batch_dims={a.v('batch_dims')}")
    axis = a.v("axis", 0) % x.ndim
    flat = torch.index_select(x, axis, (indices % x.shape[axis]).reshape(-1))
    return flat.reshape(list(x.shape[:axis]) + list(indices.shape) + list(x.shape[axis + 1:]))


@kernel("gather_nd")
def _gather_nd(a: Op) -> torch.Tensor:
    x, indices = a.t("x"), a.t("indices").long()
    if a.v("batch_dims", 0):
        raise a.unsupported(f"batch_dims={a.v('batch_dims')}")
    return x[tuple(indices[..., k] for k in range(indices.shape[-1]))]


@kernel("gather_along_axis")
def _gather_along_axis(a: Op) -> torch.Tensor:
    x = a.t("x")
    axis = a.v("axis", 0) % x.ndim
    return torch.gather(x, axis, a.t("indices").long() % x.shape[axis])


@kernel("tile")
def _tile(a: Op) -> torch.Tensor:
    return a.t("x").repeat(a.v("reps"))


@kernel("fill")
def _fill(a: Op) -> torch.Tensor:
    return torch.full(a.v("shape"), a.v("value", 0.0), dtype=a.out_dtype())


@kernel("range_1d")
def _range(a: Op) -> torch.Tensor:
    return torch.arange(a.v("start"), a.v("end"), a.v("step"), dtype=a.out_dtype())


@kernel("band_part")
def _band_part(a: Op) -> torch.Tensor:
    x = a.t("x")
    lower, upper = a.v("lower", -1), a.v("upper", -1)
    rows = torch.arange(x.shape[-2]).unsqueeze(-1)
    cols = torch.arange(x.shape[-1]).unsqueeze(0)
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    if lower >= 0:
        keep &= rows - cols <= lower
    if upper >= 0:
        keep &= cols - rows <= upper
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype))


@kernel("pad")
def _pad(a: Op) -> torch.Tensor:
    x, pad = a.t("x"), list(a.v("pad"))
    mode = a.v("mode", "constant")
    if mode == "constant":
        n = len(pad) // 2  # MIL: (before, after) for each of the last n dims, in order; F.pad: last dim first
        torch_pad = [p for i in reversed(range(n)) for p in (pad[2 * i], pad[2 * i + 1])]
        return F.pad(x, torch_pad, value=float(a.v("constant_val", 0.0)))
    if mode not in ("reflect", "replicate"):
        raise a.unsupported(f"mode {mode}")
    # torch reflects/replicates over the last ndim-2 or ndim-1 dims: drop unpadded leading pairs, add zero ones.
    while len(pad) // 2 > x.ndim - 2 and pad[0] == pad[1] == 0:
        pad = pad[2:]
    if len(pad) // 2 > x.ndim - 1:
        raise a.unsupported(f"{mode} padding of the first dimension")
    pad = [0, 0] * max(0, x.ndim - 2 - len(pad) // 2) + pad
    n = len(pad) // 2
    return F.pad(x, [p for i in reversed(range(n)) for p in (pad[2 * i], pad[2 * i + 1])], mode=mode)


@kernel("upsample_nearest_neighbor")
def _upsample_nearest(a: Op) -> torch.Tensor:
    x = a.t("x")
    sh, sw = a.v("scale_factor_height", 1), a.v("scale_factor_width", 1)
    size = (int(math.floor(x.shape[-2] * sh)), int(math.floor(x.shape[-1] * sw)))
    return F.interpolate(x, size=size, mode="nearest")


# --- compressed weights (constexpr ops: decompressed once, like consts) ---------------------------------


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Values of ``nbits`` packed little-endian (least significant bit first) into bytes."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    return (bits.astype(np.uint32) << np.arange(nbits, dtype=np.uint32)).sum(axis=1)


def _block_expand(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat per-block ``values`` (same rank as ``shape``) so each element of ``shape`` has its block's value."""
    for axis, (n, size) in enumerate(zip(values.shape, shape)):
        if n != size:
            values = np.repeat(values, size // n, axis=axis)
    return values


@kernel("constexpr_lut_to_dense")
def _lut_to_dense(a: Op) -> torch.Tensor:
    lut, indices = np.asarray(a.op.inputs["lut"].val), np.asarray(a.op.inputs["indices"].val)
    if a.has("shape"):  # iOS16: one palette, indices packed into bytes
        shape = [int(s) for s in a.v("shape")]
        nbits = int(round(math.log2(lut.size)))
        dense = lut[_unpack_bits(indices, nbits, int(np.prod(shape)))].reshape(shape)
    else:  # iOS18: a palette per block, indices with the output's shape
        if lut.shape[-1] != 1:
            raise a.unsupported(f"vector palettization (vector size {lut.shape[-1]})")
        rank = indices.ndim
        palettes = _block_expand(lut[..., 0], indices.shape + (lut.shape[rank],))
        dense = np.take_along_axis(palettes, indices.astype(np.int64)[..., None], axis=-1)[..., 0]
    return torch.from_numpy(np.ascontiguousarray(dense))


def _promote(values: np.ndarray, rank: int, axis: int, size: int) -> np.ndarray:
    """A scalar or per-``axis`` vector as a tensor that broadcasts against data of ``rank`` dims."""
    values = np.asarray(values)
    if values.ndim == 0:
        return values
    shape = [1] * rank
    shape[axis] = size
    return values.reshape(shape)


@kernel("constexpr_affine_dequantize")
def _affine_dequantize(a: Op) -> torch.Tensor:
    data = np.asarray(a.op.inputs["quantized_data"].val)
    axis = a.v("axis") % data.ndim
    scale = _promote(a.op.inputs["scale"].val, data.ndim, axis, data.shape[axis])
    zero = _promote(a.op.inputs["zero_point"].val, data.ndim, axis, data.shape[axis])
    dense = (data.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)
    return torch.from_numpy(dense.astype(np.asarray(a.op.inputs["scale"].val).dtype))


@kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(a: Op) -> torch.Tensor:
    data = np.asarray(a.op.inputs["data"].val)
    scale = np.asarray(a.op.inputs["scale"].val)
    dense = data.astype(np.float32)
    if a.has("offset"):
        dense = dense - _block_expand(np.asarray(a.op.inputs["offset"].val).astype(np.float32), data.shape)
    dense = dense * _block_expand(scale.astype(np.float32), data.shape)
    return torch.from_numpy(dense.astype(scale.dtype))


#: operations whose inputs are all compile-time constants: evaluated once, at load.
CONSTEXPR = {name for name in KERNELS if name.startswith("constexpr_")}


# --- the program --------------------------------------------------------------------------------------------


class MilReference:
    """Runs one saved ML Program with torch kernels.

    Args:
        package: the ``.mlpackage`` folder.

    Raises:
        UnsupportedOpError: the program uses operations without a kernel here (all are named).
    """

    def __init__(self, package: Path):
        self.package = Path(package)
        self.function = load_program(self.package)
        self.ops = list(self.function.operations)
        missing = sorted({op.op_type for op in self.ops} - set(KERNELS) - {"const"})
        if missing:
            raise UnsupportedOpError(f"{self.package.name} uses MIL operation(s) {', '.join(missing)}, which the MIL "
                                     f"reference evaluator does not implement; it cannot check this model")
        self.inputs = {name: torch_dtype(var.dtype) for name, var in self.function.inputs.items()}
        self.outputs = [var.name for var in self.function.outputs]
        self.constants: dict[str, Any] = {}
        self.program_ops: list[Any] = []
        for op in self.ops:
            if op.op_type == "const":
                self.constants[op.outputs[0].name] = _constant(op.outputs[0])
            elif op.op_type in CONSTEXPR:
                self.constants[op.outputs[0].name] = KERNELS[op.op_type](Op(op, self.constants))
            else:
                self.program_ops.append(op)
        self._last_use = self._lifetimes()

    def _lifetimes(self) -> dict[str, int]:
        """Index of the last op that reads each computed value, so it can be freed after that op."""
        last: dict[str, int] = {}
        for i, op in enumerate(self.program_ops):
            for var in op.inputs.values():
                for v in var if isinstance(var, (list, tuple)) else (var,):
                    last[v.name] = i
        return last

    def op_types(self) -> set[str]:
        return {op.op_type for op in self.ops}

    def run(self, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Execute the program on ``feeds`` (arrays or tensors by input name)."""
        env: dict[str, Any] = dict(self.constants)
        for name, dtype in self.inputs.items():
            env[name] = torch.as_tensor(np.asarray(feeds[name]) if not isinstance(feeds[name], torch.Tensor)
                                        else feeds[name]).to(dtype)
        keep = set(self.outputs)
        with torch.no_grad():
            for i, op in enumerate(self.program_ops):
                try:
                    result = KERNELS[op.op_type](Op(op, env))
                except UnsupportedOpError:
                    raise
                except Exception as exc:
                    raise UnsupportedOpError(f"MIL op {op.name} ({op.op_type}) failed in the reference evaluator: "
                                             f"{type(exc).__name__}: {exc}") from exc
                results = result if isinstance(result, (tuple, list)) else (result,)
                for var, value in zip(op.outputs, results):
                    env[var.name] = value
                for var in op.inputs.values():  # free what no later op reads
                    for v in var if isinstance(var, (list, tuple)) else (var,):
                        if self._last_use.get(v.name) == i and v.name not in keep and v.name not in self.constants:
                            env.pop(v.name, None)
        return {name: env[name] for name in self.outputs}


def _constant(var) -> Any:
    """A const op's value: a torch tensor of its MIL dtype, or the Python value of a string/list param."""
    from coremltools.converters.mil.mil import types

    value = var.val
    if isinstance(value, str) or not types.is_tensor(var.sym_type) and not types.is_scalar(var.sym_type):
        return value
    name = types.builtin_to_string(var.dtype)
    if name not in _DTYPES:  # sub-byte and other storage types only feed constexpr ops, which read .val
        return value
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value, dtype=types.nptype_from_builtin(var.dtype))))
