"""OpenVINO: IR (``openvino_model.xml`` + ``.bin``, optimum-intel's layout) through ``openvino.convert_model``,
run by OpenVINO Runtime.

Precisions are weight formats; computation stays float32 on the host side of the graph: ``fp32``,
``fp16`` (weights compressed to fp16), ``int8`` (NNCF 8-bit weight compression), ``hybrid-int8``
(the denoiser also gets 8-bit activations, calibrated on inputs recorded from eager runs) and ``int4``
(group-wise 4-bit weights on the denoiser's and T5's matrix products, 8-bit elsewhere) and ``full-int8``
(the denoiser's convolutions and matrix products compute in 8 bits: weights and activations, calibrated;
the VAE decoder's too where its outputs pass; 8-bit weights elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffship.backends.base import Backend, Details
from diffship.backends.quantized import FULL_INT8, GROUPS, keep_float_option, normalize_groups
from diffship.configs.fields import option

MODEL_FILE = "openvino_model.xml"
#: OpenVINO's CPU plugin computes in bf16 on CPUs that have it (max error ~3e-2 on the UNet); parity
#: and the default pipeline ask for f32. ``inference_precision="bf16"`` is the speed mode.
DEFAULT_PRECISION = "f32"


def normalize_f32_groups(value: Any) -> str:
    """``-o f32_groups=`` as ``none`` or a comma list of :data:`GROUPS`."""
    return normalize_groups(value, "f32_groups", GROUPS, ("none",))


@dataclass(frozen=True)
class OpenVINOExportOptions:
    """``-o`` options of an OpenVINO export.

    Attributes:
        keep_float: ``full-int8``: the layer groups left float in the denoiser and the VAE decoder --
            ``auto`` (measured: those whose quantization costs the most PSNR; the decoder stays float
            where its outputs fall under 40 dB), ``none``, or a comma list of ``ends``, ``time-embedding``,
            ``attention-scores`` and ``vae-decoder`` (the whole decoder).
        f32_groups: layer groups (``ends``, ``time-embedding``, ``attention-scores``; default ``none``) whose
            convolutions and matrix products keep computing in f32 where the runtime computes in bf16
            (``inference_precision=bf16``): the IR marks them precise, which OpenVINO's CPU plugin honours.
    """

    keep_float: str = keep_float_option()
    f32_groups: str = option("none", normalize=normalize_f32_groups)


@dataclass(frozen=True)
class OpenVINORuntimeOptions:
    """OpenVINO Runtime options.

    Attributes:
        device: OpenVINO device name (``CPU``, ``GPU``, ``NPU``, ``AUTO``...), passed through.
        threads: inference threads (``INFERENCE_NUM_THREADS``).
        inference_precision: ``f32`` (default, exact) or ``bf16``/``f16`` (faster where supported).
        ov_config: further OpenVINO properties, passed through (they win over the above).
        cache_dir: OpenVINO model cache folder (``CACHE_DIR``), reused across processes.
        static_shapes: compile a static model per request shape (default) instead of one dynamic model.
    """

    device: str = option("CPU", normalize=lambda v: v.upper() if isinstance(v, str) else v)
    threads: int | None = option(None, minimum=1)
    inference_precision: str = DEFAULT_PRECISION
    ov_config: dict[str, Any] | None = None
    cache_dir: str | None = None
    static_shapes: bool = True


@dataclass(kw_only=True)
class OpenVINODetails(Details):
    """What an OpenVINO export records per component.

    Attributes:
        weights: the weight format (``fp32``, ``fp16``, ``int8``, ``int4``).
        activations: how activations are quantized (hybrid int8's denoiser), or None (float).
        int4: for 4-bit weights, how many weights NNCF made 4-bit and how many it kept 8-bit.
        f32_nodes: the nodes marked to compute f32 under bf16 inference (``-o f32_groups``), or None.
    """

    weights: str
    activations: str | None = None
    int4: str | None = None
    f32_nodes: str | None = None


OPENVINO = Backend(
    name="openvino", extra="openvino", packages=("openvino",), runtime_packages=("openvino",),
    optional_packages=("nncf",), precisions=("fp32", "fp16", "int8", "hybrid-int8", FULL_INT8, "int4"),
    calibrated=("hybrid-int8", FULL_INT8),
    model_file=MODEL_FILE, streams=True, export_options=OpenVINOExportOptions, runtime_options=OpenVINORuntimeOptions, details=OpenVINODetails,
    exporter="diffship.exporters.openvino", runner="diffship.runtimes.openvino:OVRunner",
)
