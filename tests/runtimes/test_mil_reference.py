"""The MIL reference evaluator, op by op: each kernel against torch, and loud refusal of anything else.

Each case builds a one-op ML Program with coremltools' MIL builder (no optimization passes, so the op
under test is what gets saved), saves it as an ``.mlpackage``, evaluates it with the reference
evaluator and compares with the same computation written in torch from the op's documented
semantics. A final test checks that every kernel the evaluator has is covered here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.coreml
ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from diffship.runtimes.mil import KERNELS, MilReference, UnsupportedOpError  # noqa: E402

RNG = np.random.default_rng(0)
TESTED: set[str] = set()


def save(prog, tmp_path, target=ct.target.iOS16):
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       pass_pipeline=ct.PassPipeline.EMPTY, compute_precision=ct.precision.FLOAT32,
                       skip_model_load=True)
    path = tmp_path / "op.mlpackage"
    model.save(str(path))
    return path


def run(build, inputs: dict[str, np.ndarray], tmp_path, target=ct.target.iOS16, op_type=None):
    """Build a program from ``build(**placeholders)``, save it, evaluate it; check the op is in it."""
    from coremltools.converters.mil.mil import Function, Program

    placeholders = {name: mb.placeholder(shape=v.shape, dtype=types.fp32 if v.dtype == np.float32 else types.int32)
                    for name, v in inputs.items()}
    with Function(placeholders, opset_version=target) as function:
        outputs = build(**function.inputs)
        function.set_outputs(list(outputs) if isinstance(outputs, (tuple, list)) else [outputs])
    prog = Program()
    prog.add_function("main", function)
    ref = MilReference(save(prog, tmp_path, target))
    if op_type:
        assert op_type in ref.op_types(), f"{op_type} not in the saved program: {ref.op_types()}"
        TESTED.add(op_type)
    out = ref.run(inputs)
    return [o.numpy() for o in out.values()]


def x(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def close(actual, expected, atol=1e-5):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=1e-5)


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "real_div": torch.true_divide,
          "maximum": torch.maximum, "minimum": torch.minimum}
COMPARE = {"equal": torch.eq, "not_equal": torch.ne, "less": torch.lt, "less_equal": torch.le, "greater": torch.gt,
           "greater_equal": torch.ge}
UNARY = {"abs": torch.abs, "square": torch.square, "exp": torch.exp, "sin": torch.sin, "cos": torch.cos,
         "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf, "floor": torch.floor, "ceil": torch.ceil,
         "relu": torch.relu, "silu": F.silu, "identity": lambda t: t}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary(name, tmp_path):
    a, b = x(2, 3, 4), x(3, 1, low=0.5, high=2.0)  # broadcasting, as MIL allows
    (got,) = run(lambda a, b: getattr(mb, name)(x=a, y=b), {"a": a, "b": b}, tmp_path, op_type=name)
    close(got, BINARY[name](torch.from_numpy(a), torch.from_numpy(b)))


@pytest.mark.parametrize("name", sorted(COMPARE))
def test_comparisons_and_select(name, tmp_path):
    a, b = x(4, 5), x(4, 5)
    b[0] = a[0]  # ties, so equal/less_equal are exercised
    (got,) = run(lambda a, b: mb.select(cond=getattr(mb, name)(x=a, y=b), a=a, b=b), {"a": a, "b": b}, tmp_path,
                 op_type=name)
    TESTED.add("select")
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    close(got, torch.where(COMPARE[name](ta, tb), ta, tb))


def test_logical_ops(tmp_path):
    a, b = x(3, 4), x(3, 4)
    got, = run(lambda a, b: mb.cast(x=mb.logical_or(x=mb.logical_and(x=mb.greater(x=a, y=0.0), y=mb.less(x=b, y=0.5)),
                                                    y=mb.logical_not(x=mb.greater(x=b, y=-1.0))), dtype="fp32"),
               {"a": a, "b": b}, tmp_path)
    TESTED.update({"logical_and", "logical_or", "logical_not", "cast"})
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    close(got, (((ta > 0) & (tb < 0.5)) | ~(tb > -1)).float())


@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, tmp_path):
    a = x(3, 7)
    (got,) = run(lambda a: getattr(mb, name)(x=a), {"a": a}, tmp_path, op_type=name)
    close(got, UNARY[name](torch.from_numpy(a)))


def test_unary_with_epsilon_and_pow(tmp_path):
    a = x(3, 7, low=0.1, high=3.0)
    got = run(lambda a: (mb.sqrt(x=a), mb.rsqrt(x=a, epsilon=1e-3), mb.inverse(x=a, epsilon=1e-2),
                         mb.log(x=a, epsilon=1e-4), mb.pow(x=a, y=1.7), mb.clip(x=a, alpha=0.5, beta=2.0)),
              {"a": a}, tmp_path)
    TESTED.update({"sqrt", "rsqrt", "inverse", "log", "pow", "clip"})
    t = torch.from_numpy(a)
    for g, e in zip(got, (t.sqrt(), torch.rsqrt(t + 1e-3), 1 / (t + 1e-2), torch.log(t + 1e-4), t ** 1.7,
                          t.clamp(0.5, 2.0))):
        close(g, e)


@pytest.mark.parametrize("mode, expected", [("EXACT", lambda t: F.gelu(t)),
                                            ("TANH_APPROXIMATION", lambda t: F.gelu(t, approximate="tanh")),
                                            ("SIGMOID_APPROXIMATION", lambda t: t * torch.sigmoid(1.702 * t))])
def test_gelu_modes(mode, expected, tmp_path):
    a = x(4, 6)
    (got,) = run(lambda a: mb.gelu(x=a, mode=mode), {"a": a}, tmp_path, op_type="gelu")
    close(got, expected(torch.from_numpy(a)))


def test_linear_matmul_einsum_softmax(tmp_path):
    a, b, w, bias = x(2, 5, 8), x(2, 6, 8), x(3, 8), x(3)
    q, k = x(2, 4, 1, 5), x(2, 5, 1, 6)  # MIL einsum: (B, C, H, W1) x (B, W1, H, W2), as split_einsum emits
    got = run(lambda a, b, q, k: (mb.linear(x=a, weight=w, bias=bias), mb.matmul(x=a, y=b, transpose_y=True),
                                  mb.softmax(x=a, axis=1),
                                  mb.einsum(values=(q, k), equation="bchk,bkhq->bchq")),
              {"a": a, "b": b, "q": q, "k": k}, tmp_path)
    TESTED.update({"linear", "matmul", "softmax", "einsum"})
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    close(got[0], F.linear(ta, torch.from_numpy(w), torch.from_numpy(bias)))
    close(got[1], ta @ tb.transpose(1, 2))
    close(got[2], ta.softmax(1))
    close(got[3], torch.einsum("bchk,bkhq->bchq", torch.from_numpy(q), torch.from_numpy(k)))


@pytest.mark.parametrize("kwargs, torch_kwargs", [
    ({"pad_type": "custom", "pad": [1, 1, 1, 1], "strides": [2, 2]}, {"padding": 1, "stride": 2}),
    ({"pad_type": "valid", "dilations": [2, 2]}, {"dilation": 2}),
    ({"pad_type": "same"}, {"padding": "same"}),
    ({"pad_type": "custom", "pad": [0, 1, 2, 0], "groups": 2}, {"groups": 2, "pre_pad": (2, 0, 0, 1)}),
])
def test_conv(kwargs, torch_kwargs, tmp_path):
    a = x(1, 4, 9, 8)
    groups = kwargs.get("groups", 1)
    w, bias = x(6, 4 // groups, 3, 3), x(6)
    (got,) = run(lambda a: mb.conv(x=a, weight=w, bias=bias, **kwargs), {"a": a}, tmp_path, op_type="conv")
    t = torch.from_numpy(a)
    torch_kwargs = dict(torch_kwargs)
    if pre := torch_kwargs.pop("pre_pad", None):  # asymmetric padding: F.pad (last dim first), then conv
        t = F.pad(t, pre)
    close(got, F.conv2d(t, torch.from_numpy(w), torch.from_numpy(bias), **torch_kwargs), atol=1e-4)


def test_normalizations(tmp_path):
    a = x(2, 4, 5, 3)
    gamma, beta, mean, var = x(4), x(4), x(4), x(4, low=0.5, high=2.0)
    got = run(lambda a: (mb.layer_norm(x=a, axes=[1, 3], gamma=x(4, 3) * 0 + 1.5, beta=x(4, 3) * 0 + 0.25,
                                       epsilon=1e-5),
                         mb.layer_norm(x=a, axes=[-1], epsilon=1e-3),
                         mb.instance_norm(x=a, gamma=gamma, beta=beta, epsilon=1e-5),
                         mb.batch_norm(x=a, mean=mean, variance=var, gamma=gamma, beta=beta, epsilon=1e-5)),
              {"a": a}, tmp_path)
    TESTED.update({"layer_norm", "instance_norm", "batch_norm"})
    t = torch.from_numpy(a)
    m = t.mean(dim=(1, 3), keepdim=True)
    v = t.var(dim=(1, 3), keepdim=True, unbiased=False)
    close(got[0], (t - m) / torch.sqrt(v + 1e-5) * 1.5 + 0.25, atol=1e-4)  # axes that are not trailing
    close(got[1], F.layer_norm(t, (3,), eps=1e-3), atol=1e-4)
    g, b = torch.from_numpy(gamma), torch.from_numpy(beta)
    close(got[2], F.instance_norm(t, weight=g, bias=b, eps=1e-5), atol=1e-4)
    close(got[3], F.batch_norm(t, torch.from_numpy(mean), torch.from_numpy(var), g, b, eps=1e-5), atol=1e-4)


def test_scaled_dot_product_attention(tmp_path):
    q, k, v = x(2, 3, 5, 8), x(2, 3, 7, 8), x(2, 3, 7, 4)
    mask = x(5, 7)
    got = run(lambda q, k, v, m: (mb.scaled_dot_product_attention(query=q, key=k, value=v),
                                  mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m)),
              {"q": q, "k": k, "v": v, "m": mask}, tmp_path, target=ct.target.iOS18,
              op_type="scaled_dot_product_attention")
    tq, tk, tv = (torch.from_numpy(t) for t in (q, k, v))
    close(got[0], F.scaled_dot_product_attention(tq, tk, tv))
    close(got[1], F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(mask)))


def test_reductions(tmp_path):
    a = x(3, 4, 5)
    got = run(lambda a: (mb.reduce_mean(x=a, axes=[1, 2], keep_dims=True), mb.reduce_sum(x=a, axes=[0]),
                         mb.reduce_max(x=a, axes=[-1]), mb.reduce_min(x=a, axes=[1], keep_dims=True),
                         mb.reduce_prod(x=a, axes=[2]), mb.reduce_argmax(x=a, axis=1),
                         mb.reduce_argmin(x=a, axis=-1, keep_dims=True)), {"a": a}, tmp_path)
    TESTED.update({"reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_argmax",
                   "reduce_argmin"})
    t = torch.from_numpy(a)
    for g, e in zip(got, (t.mean((1, 2), keepdim=True), t.sum(0), t.amax(-1), t.amin(1, keepdim=True),
                          t.prod(2), t.argmax(1), t.argmin(-1, keepdim=True))):
        close(g, e)


def test_shape_ops(tmp_path):
    a, b = x(2, 3, 4), x(2, 3, 4)
    got = run(lambda a, b: (mb.reshape(x=a, shape=[0, -1, 2]), mb.transpose(x=a, perm=[2, 0, 1]),
                            mb.expand_dims(x=a, axes=[0, -1]), mb.squeeze(x=mb.expand_dims(x=a, axes=[1]), axes=[1]),
                            mb.concat(values=(a, b), axis=1), mb.concat(values=(a, b), axis=2, interleave=True),
                            mb.stack(values=(a, b), axis=1), *mb.split(x=a, split_sizes=[1, 3], axis=2),
                            *mb.split(x=a, num_splits=3, axis=1), mb.tile(x=a, reps=[1, 2, 1]),
                            mb.shape(x=a)),
              {"a": a, "b": b}, tmp_path)
    TESTED.update({"reshape", "transpose", "expand_dims", "squeeze", "concat", "stack", "split", "tile", "shape"})
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    expected = [ta.reshape(2, 6, 2), ta.permute(2, 0, 1), ta[None, ..., None], ta, torch.cat([ta, tb], 1),
                torch.stack([ta, tb], 3).reshape(2, 3, 8), torch.stack([ta, tb], 1), *ta.split([1, 3], 2),
                *ta.split(1, 1), ta.repeat(1, 2, 1), torch.tensor([2, 3, 4])]
    for g, e in zip(got, expected):
        close(g, e)


def test_slicing(tmp_path):
    a = x(4, 6, 5)
    got = run(lambda a: (mb.slice_by_index(x=a, begin=[1, 0, -4], end=[3, 6, 5], stride=[1, 2, 1]),
                         mb.slice_by_index(x=a, begin=[0, 5, 0], end=[0, 0, 0], stride=[1, -2, 1],
                                           begin_mask=[True, False, True], end_mask=[True, True, True]),
                         mb.slice_by_index(x=a, begin=[2, 0, 0], end=[3, 6, 5], squeeze_mask=[True, False, False]),
                         mb.slice_by_size(x=a, begin=[1, 2, 0], size=[2, -1, 3])), {"a": a}, tmp_path)
    TESTED.update({"slice_by_index", "slice_by_size"})
    t = torch.from_numpy(a)
    expected = [t[1:3, 0:6:2, -4:5], torch.from_numpy(a[:, 5::-2, :].copy()), t[2], t[1:3, 2:, 0:3]]
    for g, e in zip(got, expected):
        close(g, e)


def test_gathers(tmp_path):
    a = x(5, 4, 3)
    idx = np.array([[4, 0], [-1, 2]], dtype=np.int32)
    nd = np.array([[0, 1], [4, 3], [2, 2]], dtype=np.int32)
    along = RNG.integers(0, 4, (5, 2, 3)).astype(np.int32)
    got = run(lambda a, i, n, g: (mb.gather(x=a, indices=i, axis=0), mb.gather(x=a, indices=i, axis=-2),
                                  mb.gather_nd(x=a, indices=n), mb.gather_along_axis(x=a, indices=g, axis=1)),
              {"a": a, "i": idx, "n": nd, "g": along}, tmp_path)
    TESTED.update({"gather", "gather_nd", "gather_along_axis"})
    t, ti = torch.from_numpy(a), torch.from_numpy(idx).long() % 5
    close(got[0], t[ti])
    close(got[1], t[:, torch.from_numpy(idx).long() % 4])
    close(got[2], t[torch.from_numpy(nd[:, 0]).long(), torch.from_numpy(nd[:, 1]).long()])
    close(got[3], torch.gather(t, 1, torch.from_numpy(along).long()))


def test_pad_upsample_and_generators(tmp_path):
    a = x(1, 2, 4, 5)
    got = run(lambda a: (mb.pad(x=a, pad=[1, 2, 0, 3], mode="constant", constant_val=0.5),
                         mb.pad(x=a, pad=[0, 0, 0, 0, 1, 1, 2, 0], mode="reflect"),
                         mb.pad(x=a, pad=[1, 0, 0, 1, 1, 1, 0, 2], mode="constant"),
                         mb.pad(x=a, pad=[2, 1], mode="replicate"),
                         mb.upsample_nearest_neighbor(x=a, scale_factor_height=2, scale_factor_width=3),
                         mb.band_part(x=a, lower=1, upper=0),
                         mb.fill(shape=[2, 3], value=1.5), mb.range_1d(start=1.0, end=7.0, step=2.0)),
              {"a": a}, tmp_path)
    TESTED.update({"pad", "upsample_nearest_neighbor", "band_part", "fill", "range_1d"})
    t = torch.from_numpy(a)
    expected = [F.pad(t, (0, 3, 1, 2), value=0.5), F.pad(t, (2, 0, 1, 1), mode="reflect"),
                F.pad(t, (0, 2, 1, 1, 0, 1, 1, 0)),
                F.pad(t, (2, 1, 0, 0), mode="replicate"), F.interpolate(t, scale_factor=(2, 3), mode="nearest"),
                torch.tril(t) - torch.tril(t, -2), torch.full((2, 3), 1.5), torch.arange(1.0, 7.0, 2.0)]
    for g, e in zip(got, expected):
        close(g, e)


# --- compressed weights: decompressed as coremltools itself materializes them ------------------------------


@pytest.mark.parametrize("compress, target, op_type", [
    ("palette4", ct.target.iOS16, "constexpr_lut_to_dense"),
    ("palette6", ct.target.iOS16, "constexpr_lut_to_dense"),
    ("palette4-grouped", ct.target.iOS18, "constexpr_lut_to_dense"),
    ("int8", ct.target.iOS16, "constexpr_affine_dequantize"),
    ("int8-blocks", ct.target.iOS18, "constexpr_blockwise_shift_scale"),
])
def test_compressed_weights_match_coremltools(compress, target, op_type, tmp_path):
    import coremltools.optimize.coreml as cto

    w = x(16, 32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 32))], opset_version=target)
    def prog(a):
        return mb.linear(x=a, weight=w)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32)
    if compress.startswith("palette"):
        granularity = {"granularity": "per_grouped_channel", "group_size": 4} if "grouped" in compress else {}
        config = cto.OpPalettizerConfig(nbits=int(compress[7]), mode="kmeans", weight_threshold=1, **granularity)
        model = cto.palettize_weights(model, cto.OptimizationConfig(global_config=config))
    else:
        extra = {"granularity": "per_block", "block_size": 8} if "blocks" in compress else {}
        config = cto.OpLinearQuantizerConfig(mode="linear", dtype="int8", weight_threshold=1, **extra)
        model = cto.linear_quantize_weights(model, cto.OptimizationConfig(global_config=config))
    path = tmp_path / "compressed.mlpackage"
    model.save(str(path))
    ref = MilReference(path)
    assert op_type in ref.op_types()
    TESTED.add(op_type)
    (op,) = [o for o in ref.function.operations if o.op_type == op_type]
    ours = ref.constants[op.outputs[0].name].numpy()
    theirs = op.materialized_val_inference()
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, w)  # it is compressed: the weights changed a little
    a = x(2, 32)
    close(ref.run({"a": a})[ref.outputs[0]].numpy(), a @ theirs.T.astype(np.float32), atol=1e-4)


# --- what the evaluator refuses ----------------------------------------------------------------------


def test_an_op_without_kernel_is_refused_by_name(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3))], opset_version=ct.target.iOS16)
    def prog(a):
        return mb.atan(x=mb.cumsum(x=a, axis=1))

    with pytest.raises(UnsupportedOpError, match=r"op\.mlpackage uses MIL operation\(s\) atan, cumsum, which the MIL "
                                                 r"reference evaluator does not implement"):
        MilReference(save(prog, tmp_path))


def test_an_unimplemented_variant_is_refused(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4)), mb.TensorSpec(shape=(2, 2), dtype=types.int32)],
                opset_version=ct.target.iOS16)
    def prog(a, i):
        return mb.gather(x=a, indices=i, axis=1, batch_dims=1)

    ref = MilReference(save(prog, tmp_path))
    with pytest.raises(UnsupportedOpError, match="does not implement gather with batch_dims=1"):
        ref.run({"a": x(2, 3, 4), "i": np.zeros((2, 2), np.int32)})


def test_every_kernel_is_tested():
    """Runs last in this module (pytest keeps file order): each kernel was checked by a test above."""
    if len(TESTED) < 10:
        pytest.skip("run the whole module: this checks the coverage of the tests above")
    assert sorted(set(KERNELS) - TESTED) == []


def test_fp16_programs_compute_in_fp16(tmp_path):
    """An fp16 program's intermediate values are fp16 (so fp16 rounding and overflow show)."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(4,))], opset_version=ct.target.iOS16)
    def prog(a):
        h = mb.cast(x=a, dtype="fp16")
        return mb.cast(x=mb.mul(x=h, y=np.float16(300.0)), dtype="fp32")

    got = MilReference(save(prog, tmp_path)).run({"a": np.array([1.0, 100.0, 1000.0, 1 / 3], np.float32)})
    values = next(iter(got.values())).numpy()
    assert values[0] == 300.0 and values[1] == 30000.0 and math.isinf(values[2])  # 300000 overflows fp16
    assert values[3] == np.float32(np.float16(np.float16(1 / 3) * np.float16(300.0)))
