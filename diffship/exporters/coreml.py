"""Core ML exporter: one ML Program (``.mlpackage``) per component, converted with coremltools.

Conversion goes through ``torch.export`` (then ``run_decompositions({})``), not ``torch.jit.trace``:
coremltools 9.0's TorchScript path breaks on numpy >= 2.4 (its ``_cast`` calls ``int()`` on an array),
while the exported-program path works with any numpy. ``aten.alias`` nodes that the CLIP text
encoder's export keeps (and coremltools has no converter for) are removed first: an alias is its input.

Layout per component: ``<component>/model.mlpackage``. Inputs and outputs are float32 (compute may be
fp16) and follow Apple's Swift pipeline (ml-stable-diffusion) where it differs from the other
backends, so the packages load there unchanged (``diffship package --target swift``): the text
encoder takes ``input_ids`` as float32, the UNet takes ``encoder_hidden_states`` as (B, D, 1, S),
the layout the Neural Engine prefers. The manifest records these model-level inputs, and the
diffship runtime converts the usual (B, S, D) tensors, so pipelines use Core ML exports like any other.

Shapes are fixed at the export's size by default (what the Neural Engine runs best); ``-o sizes=...``
adds enumerated sizes, several resolutions in one model.

Precisions: ``fp32``, ``fp16`` (compute precision; the VAE stays fp32 under ``force_upcast``, any
component that overflows fp16 is exported in fp32), and weight formats on an fp16 model:
``palette4``/``palette6``/``palette8`` (k-means palettization), ``palette-mixed`` (a width per weight,
chosen by measured sensitivity to keep ``target_psnr``: :mod:`diffship.exporters.palettes`) and
``int8`` (linear symmetric quantization), through ``coremltools.optimize.coreml``. Palettes are per
weight, or per group of output channels with ``palette_granularity=per_grouped_channel`` (iOS 18).

Options (``-o KEY=VALUE``): ``attention`` (``original`` or ``split_einsum``, see
:mod:`diffship.reference.attention`), ``deployment_target`` (``macOS13`` default, ``macOS14``,
``macOS15``, ``iOS16``, ``iOS17``, ``iOS18``), ``palette_granularity``, ``palette_group_size``,
``palette_bits``, ``target_psnr`` (palettes), ``sizes`` (``512x512,768x768``: enumerated image sizes;
the export's own size comes first and is the default), and metadata ``author``, ``license``, ``version``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffship._isolate import run_isolated
from diffship.backends.coreml import (APPLE_INPUTS, COMPUTE, COREML, MODEL_FILE, CoreMLDetails, CoreMLExportOptions,
                                      MixedBits, ModelInput, adaptation, model_shape, program_ops, to_model_inputs)
from diffship.backends.manifest import ComponentEntry, TensorIO
from diffship.errors import ExportError, ShapeError, first_line
from diffship.exporters.base import ExportOptions, component_files, quiet_export
from diffship.exporters.palettes import MIN_SIZE, UNCOMPRESSED, Choice, choose_bits, covered
from diffship.reference.attention import with_attention
from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import ComponentSpec

#: how many inputs ``palette-mixed`` measures each weight's sensitivity on (spread over the recorded calls).
MIXED_SAMPLES = 4
#: dims whose sizes vary between enumerated image sizes.
SPATIAL = ("height", "width", "latent_height", "latent_width")

DESCRIPTIONS = {
    "input_ids": "CLIP token ids (as float32, as Apple's Swift pipeline passes them), padded to the sequence length",
    "last_hidden_state": "text embeddings: the text encoder's last hidden state",
    "pooler_output": "pooled text embedding (the end-of-text token's)",
    "penultimate_hidden_state": "text embeddings: the text encoder's penultimate hidden state (SDXL's conditioning)",
    "text_embeds": "projected pooled text embedding (SDXL: text_encoder_2 output, UNet added condition)",
    "time_ids": "SDXL size and crop conditioning (original size, crop offset, target size; or aesthetic score)",
    "timestep_cond": "guidance-scale embedding of LCM-distilled UNets",
    "sample": "latents (UNet) or image in [-1, 1] (VAE encoder input, VAE decoder output)",
    "timestep": "denoising timestep, one per batch row",
    "encoder_hidden_states": "text embeddings as (batch, channels, 1, sequence)",
    "out_sample": "the UNet's prediction (noise, or v for v-prediction models)",
    "latent_parameters": "mean and log-variance of the latent distribution (sampled by the pipeline)",
    "latent_sample": "latents divided by the VAE scaling factor",
}


# --- the graphs that are converted --------------------------------------------------------------------


class AppleIO(nn.Module):
    """A component wrapper with the model inputs Apple's Swift pipeline passes (see ``APPLE_INPUTS``)."""

    def __init__(self, inner: nn.Module, spec: ComponentSpec):
        super().__init__()
        self.inner = inner
        self.names = spec.input_names
        self.adapt = APPLE_INPUTS.get(spec.name, {})

    def forward(self, *inputs: torch.Tensor):
        args = []
        for name, value in zip(self.names, inputs):
            if name == "input_ids" and name in self.adapt:
                value = value.to(torch.int64)
            elif self.adapt.get(name, (None, None))[1] == "bc1s":
                value = value.squeeze(2).transpose(1, 2)
            args.append(value)
        return self.inner(*args)


def strip_aliases(program) -> int:
    """Remove ``aten.alias`` nodes from an exported program (an alias is its input); returns how many."""
    graph = program.graph_module.graph
    removed = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
    if removed:
        program.graph_module.recompile()
    return removed


def _fp16_op():
    """coremltools' fp16 op selector: every op but those the sines and cosines are computed from (timestep
    frequencies, Flux's rotary angles from its token ids), where an angle of hundreds of radians in fp16 is
    a wrong phase. Measured on tiny-flux: its fp16 transformer with the angles in fp16, max abs 0.22 and
    cosine 0.99934 (fp16 parity needs 1e-2, 0.9999)."""
    precise: dict[int, set[int]] = {}

    def ancestors(block) -> set[int]:
        found: set[int] = set()
        stack = [op for op in block.operations if op.op_type in ("sin", "cos")]
        while stack:
            op = stack.pop()
            if id(op) in found:
                continue
            found.add(id(op))
            for value in op.inputs.values():
                for var in value if isinstance(value, (list, tuple)) else (value,):
                    if getattr(var, "op", None) is not None:
                        stack.append(var.op)
        return found

    def select(op) -> bool:
        block = op.enclosing_block
        if id(block) not in precise:
            precise[id(block)] = ancestors(block)
        return id(op) not in precise[id(block)]

    return select


# --- export ----------------------------------------------------------------------------------------------


def export(spec: ComponentSpec, module: nn.Module, out_dir: Path, options: ExportOptions) -> ComponentEntry:
    """Convert ``module`` to ``out_dir/model.mlpackage`` (ML Program), compress and describe it.

    ``options.backend`` is a :class:`~diffship.backends.coreml.CoreMLExportOptions` (defaults when None).
    """
    COREML.require()
    opts: CoreMLExportOptions = options.backend or CoreMLExportOptions()
    import coremltools as ct

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module = with_attention(module.float().eval(), opts.attention)
    sizes = _sizes(opts, options)
    variants = [spec_input_shapes(spec, options.profile, size) for size in sizes]
    graph = AppleIO(module, spec).eval()
    example = tuple(_model_example(spec, options.profile).values())
    fp16 = COMPUTE.get(options.precision, options.precision) == "fp16"
    try:
        with quiet_export(), torch.no_grad():
            program = torch.export.export(graph, example, dynamic_shapes=_dynamic_shapes(spec, variants, options))
            program = program.run_decompositions(_decompositions(len(sizes) > 1))
            strip_aliases(program)
            mlmodel = ct.convert(
                program, inputs=_ct_inputs(spec, variants), outputs=[ct.TensorType(name=n, dtype=np.float32)
                                                                     for n in spec.output_names],
                convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, opts.deployment_target),
                compute_precision=ct.transform.FP16ComputePrecision(op_selector=_fp16_op()) if fp16
                else ct.precision.FLOAT32, skip_model_load=True,
            )
            widths = mixed = None
            if options.precision == "palette-mixed":
                widths, mixed = _mixed_widths(spec, module, mlmodel, opts, options)
            mlmodel = _compress(mlmodel, options.precision, opts, widths)
    except (ExportError, ShapeError):
        raise
    except Exception as exc:
        raise ExportError(f"converting {spec.name} to Core ML failed ({type(exc).__name__}): {first_line(exc)}; "
                          f"re-run with --debug") from exc
    _describe(mlmodel, spec, opts, options)
    path = out_dir / MODEL_FILE
    mlmodel.save(str(path))
    # Reading the package back is native code (milstorage): in a child, so a crash is an error message.
    ops = run_isolated(f"reading back {spec.name}/{MODEL_FILE}", program_ops, str(path), error=ExportError)
    inputs, outputs = _io(spec, options, sizes)
    details = CoreMLDetails(
        attention=opts.attention, deployment_target=opts.deployment_target,
        compute_precision="fp16" if fp16 else "fp32",
        weights=options.precision if options.precision in COMPUTE else None,
        palette_group_size=opts.group_size if options.precision.startswith("palette") else None,
        mixed_bits=mixed, sizes=[list(s) for s in sizes],
        model_inputs=[ModelInput(name=n, dtype=adaptation(spec.name, n)[0], layout=adaptation(spec.name, n)[1],
                                 shapes=[list(model_shape(spec.name, n, v[n])) for v in variants])
                      for n in spec.input_names],
        mil_ops=ops,
    )
    return ComponentEntry(component=spec.name, source=spec.source, files=component_files(out_dir),
                          precision=options.precision, inputs=inputs, outputs=outputs, details=details)


def _io(spec: ComponentSpec, options: ExportOptions,
        sizes: list[tuple[int, int]]) -> tuple[tuple[TensorIO, ...], tuple[TensorIO, ...]]:
    """The manifest's inputs and outputs: what the runner takes (the spec's layouts, float32 or int64),
    fixed at the export's size except the dims that differ between enumerated sizes."""
    values = [spec.dims(_at(options.profile, size)) for size in sizes]
    varying = {name for name in SPATIAL if len({v[name] for v in values}) > 1}

    def describe(t) -> TensorIO:
        return TensorIO(name=t.name, dtype="int64" if t.dtype == "int64" else "float32",
                        dims=[d if isinstance(d, int) or d in varying else values[0][d] for d in t.dims])

    return tuple(describe(t) for t in spec.inputs), tuple(describe(t) for t in spec.outputs)


def _sizes(opts: CoreMLExportOptions, options: ExportOptions) -> list[tuple[int, int]]:
    """The export's own size first, then the other enumerated sizes, validated."""
    own = (options.profile.height, options.profile.width)
    sizes = [own] + [s for s in opts.sizes if s != own]
    for h, w in sizes:
        ShapeProfile(height=h, width=w).validate(options.size_multiple)
    return sizes


def _at(profile: ShapeProfile, size: tuple[int, int]) -> ShapeProfile:
    """``profile`` (batch, sequence, guidance) at another image size."""
    return replace(profile, height=size[0], width=size[1])


def spec_input_shapes(spec: ComponentSpec, profile: ShapeProfile, size: tuple[int, int]) -> dict[str, tuple]:
    """Each spec input's shape for a request of ``size`` (batch and sequence from ``profile``)."""
    dims = spec.dims(_at(profile, size))
    return {t.name: t.shape(dims) for t in spec.inputs}


def _model_example(spec: ComponentSpec, profile: ShapeProfile) -> dict[str, torch.Tensor]:
    example = {k: t.numpy() for k, t in spec.example_inputs(profile, "fp32").items()}
    adapted = to_model_inputs({n: adaptation(spec.name, n) for n in example}, example)
    return {n: torch.as_tensor(v) for n, v in adapted.items()}


def _dynamic_shapes(spec: ComponentSpec, variants: list[dict[str, tuple]], options: ExportOptions):
    """torch.export dims for the axes that differ between enumerated sizes (in steps the UNet takes)."""
    if len(variants) == 1:
        return None
    shapes = {}
    cache: dict[str, Any] = {}
    for t in spec.inputs:
        axes = {}
        for i, dim in enumerate(t.dims):
            values = {v[t.name][i] for v in variants}
            if len(values) > 1:
                step = options.size_multiple // (spec.scale_factor if dim.startswith("latent") else 1)
                if dim not in cache:
                    cache[dim] = step * torch.export.Dim(dim, min=min(values) // step, max=max(values) // step)
                axes[i] = cache[dim]
        shapes[t.name] = axes or None
    # AppleIO.forward(*inputs) has one (variadic) parameter: its dims, in the spec's input order.
    return (tuple(shapes[n] for n in spec.input_names),) if any(shapes.values()) else None


def _where_scalar_other(condition: torch.Tensor, value: torch.Tensor, other: Any) -> torch.Tensor:
    """``where(condition, value, scalar)`` with the scalar as a tensor: coremltools converts ``where.self``
    but not ``where.ScalarOther`` (which T5's relative-position buckets use)."""
    return torch.where(condition, value, torch.full_like(value, other))


def _decompositions(dynamic: bool) -> dict:
    """Core ATen as it is, with ``where.ScalarOther`` rewritten (see :func:`_where_scalar_other`), and
    group norm decomposed where shapes vary (coremltools' own group-norm conversion cannot take symbolic
    sizes)."""
    table = {torch.ops.aten.where.ScalarOther: _where_scalar_other}
    if not dynamic:
        return table
    from torch._decomp import get_decompositions

    return {**table, **get_decompositions([torch.ops.aten.group_norm, torch.ops.aten.native_group_norm])}


def _ct_inputs(spec: ComponentSpec, variants: list[dict[str, tuple]]) -> list:
    import coremltools as ct

    inputs = []
    for name in spec.input_names:
        shapes = [model_shape(spec.name, name, v[name]) for v in variants]
        distinct = list(dict.fromkeys(shapes))
        shape = distinct[0] if len(distinct) == 1 else ct.EnumeratedShapes(shapes=distinct, default=distinct[0])
        inputs.append(ct.TensorType(name=name, shape=shape, dtype=np.float32))
    return inputs


def _compress(mlmodel, precision: str, opts: CoreMLExportOptions, widths: dict[str, int] | None = None):
    """Apply the weight format: k-means palettization (4/6/8 bits, or ``widths`` per constant for
    ``palette-mixed``; per tensor or per grouped channel) or linear int8."""
    if precision not in COMPUTE:
        return mlmodel
    import coremltools.optimize.coreml as cto

    if precision == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                                  dtype="int8"))
        return cto.linear_quantize_weights(mlmodel, config)

    def palette(nbits: int):
        if opts.group_size:
            return cto.OpPalettizerConfig(nbits=nbits, mode="kmeans", granularity="per_grouped_channel",
                                          group_size=opts.group_size)
        return cto.OpPalettizerConfig(nbits=nbits, mode="kmeans")

    if widths is not None:  # palette-mixed: only the named constants, each with its own width
        chosen = {name: palette(bits) for name, bits in widths.items() if bits != UNCOMPRESSED}
        if not chosen:
            return mlmodel
        return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=chosen))
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(global_config=palette(int(precision[-1]))))


def _mixed_bits(spec: ComponentSpec, module: nn.Module, opts: CoreMLExportOptions,
                options: ExportOptions) -> Choice:
    """Palette widths per weight of ``module`` for ``palette-mixed``, measured on up to ``MIXED_SAMPLES``
    recorded calls (the denoiser) or seeded example inputs (the other components)."""
    if options.calibration:
        calls = options.calibration
        picked = [calls[round(i * (len(calls) - 1) / max(MIXED_SAMPLES - 1, 1))]
                  for i in range(min(MIXED_SAMPLES, len(calls)))]
    else:
        picked = [spec.example_inputs(options.profile, "fp32", seed=i) for i in range(2)]
    samples = [tuple(call[n].float() if call[n].is_floating_point() else call[n] for n in spec.input_names)
               for call in picked]
    return choose_bits(module, samples, opts.target_psnr, opts.palette_bits, opts.group_size)


def _mixed_widths(spec: ComponentSpec, module: nn.Module, mlmodel, opts: CoreMLExportOptions,
                  options: ExportOptions) -> tuple[dict[str, int], MixedBits]:
    """``palette-mixed``: the width per program constant, and the record of how it was chosen."""
    choice = _mixed_bits(spec, module, opts, options)
    weights = covered(module)
    names = constant_names(mlmodel, weights)
    # A weight whose constant is not found stays fp16: less noise than was measured, never more.
    bits = {n: choice.bits[n] if n in names else UNCOMPRESSED for n in weights}
    size = sum(w.numel() for w in weights.values()) or 1
    mixed = MixedBits(target_psnr=opts.target_psnr, psnr=None if math.isinf(choice.psnr) else round(choice.psnr, 2),
                      average_bits=round(sum(bits[n] * w.numel() for n, w in weights.items()) / size, 3),
                      samples=choice.samples, bits={names[n]: b for n, b in bits.items() if n in names})
    return mixed.bits, mixed


def constant_names(mlmodel, weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """torch parameter name -> the name of the program constant holding it.

    torch.export names a parameter ``p_<path with underscores>`` (``inner`` is :class:`AppleIO`'s
    attribute) and an fp16 conversion appends ``_to_fp16``; a weight that graph passes reshaped (split-
    einsum attention turns linear weights into 1x1 convolutions) is found by its values instead.
    """
    import coremltools.optimize.coreml as cto

    with quiet_export():
        constants = cto.get_weights_metadata(mlmodel, weight_threshold=MIN_SIZE)
    found: dict[str, str] = {}
    by_values: dict[tuple, str] = {}
    for const, meta in constants.items():
        value = np.asarray(meta.val)
        by_values.setdefault((value.size, value.astype(np.float16).tobytes()), const)
    for name, weight in weights.items():
        stem = "p_inner_" + name.replace(".", "_")
        const = next((c for c in (stem + "_to_fp16", stem) if c in constants), None)
        if const is None:
            value = weight.detach().numpy().astype(np.float16)
            const = by_values.get((value.size, value.tobytes()))
        if const is not None:
            found[name] = const
    return found


def _describe(mlmodel, spec: ComponentSpec, opts: CoreMLExportOptions, options: ExportOptions) -> None:
    """Model metadata: author, license, version, descriptions, and where the model came from."""
    meta = options.metadata
    source = meta.get("source", "unknown source")
    mlmodel.author = opts.author or "diffship"
    mlmodel.license = opts.license or f"the license of {source} applies"
    mlmodel.version = opts.version or meta.get("source_fingerprint", "")[:12]
    mlmodel.short_description = (f"{spec.name} of {source} ({meta.get('pipeline_class', 'diffusers pipeline')}), "
                                 f"exported by diffship {meta.get('diffship_version', '')}: {options.precision}, "
                                 f"{opts.attention} attention")
    for name in spec.input_names:
        mlmodel.input_description[name] = DESCRIPTIONS.get(name, name)
    for name in spec.output_names:
        mlmodel.output_description[name] = DESCRIPTIONS.get(name, name)
    mlmodel.user_defined_metadata.update({
        "diffship_version": meta.get("diffship_version", ""), "source": source,
        "source_fingerprint": meta.get("source_fingerprint", ""), "component": spec.name,
        "precision": options.precision, "attention": opts.attention,
    })
