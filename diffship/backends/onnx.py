"""ONNX: exported with ``torch.onnx.export(dynamo=True)``, run by ONNX Runtime.

Layout per component (as optimum writes it): ``<component>/model.onnx`` and, past the 2 GB protobuf
limit or when asked, the weights in ``<component>/model.onnx.data``. ``full-int8``: the denoiser in ONNX
Runtime's QDQ format (8-bit weights and activations on its convolutions and matrix products, calibrated
on recorded eager calls), the VAE decoder too where its outputs pass; the other components fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffship.backends.base import Backend, Details
from diffship.backends.quantized import FULL_INT8, keep_float_option
from diffship.configs.fields import option

MODEL_FILE = "model.onnx"
MIN_OPSET = 17
#: the opset the exporter writes; older ones are converted by onnx's C API from the whole serialized model.
STREAMED_MIN_OPSET = 18
#: full-int8 calibrates at images of at most this side by default: ONNX Runtime's calibrator keeps the
#: inputs of every quantized op of a call in memory -- with SD 1.5's attention scores at 512x512 over 10 GB.
CALIBRATION_SIDE = 256
#: short provider names accepted by ``device=`` / ``--device``; full names pass through.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass(frozen=True)
class OnnxExportOptions:
    """``-o`` options of an ONNX export.

    Attributes:
        opset: the ONNX opset (17 or newer).
        external_data: store weights in ``model.onnx.data``: true, false, or unset to decide by size
            (graphs past the 2 GB protobuf limit must).
        check: run ``onnx.checker`` with full shape inference on the saved graph (in a child process);
            false skips it, for a tool that validates the graph as it reads it (the manifest records it).
        keep_float: ``full-int8``: the layer groups left float in the denoiser and the VAE decoder --
            ``auto`` (measured: those whose quantization costs the most PSNR; the decoder stays float
            where its outputs fall under 40 dB), ``none``, or a comma list of ``ends``, ``time-embedding``,
            ``attention-scores`` and ``vae-decoder`` (the whole decoder).
    """

    opset: int = option(18, minimum=MIN_OPSET)
    external_data: bool | None = None
    check: bool = True
    keep_float: str = keep_float_option()

    @property
    def cannot_stream(self) -> str | None:
        """Why an export with these options cannot stream its weights, or None."""
        if self.opset < STREAMED_MIN_OPSET:
            return (f"opset {self.opset} goes through onnx's version converter, which takes the whole model in "
                    f"memory (the exporter writes opset {STREAMED_MIN_OPSET})")
        return None


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """ONNX Runtime options.

    Attributes:
        device: execution provider, by short name (``cpu``, ``cuda``, ``tensorrt``...) or full name, or a
            list of them, highest priority first (the CPU provider is always the last fallback).
        threads: intra-op threads (default: onnxruntime's choice, one per core).
        provider_options: per-provider option dicts, in the order of ``device``.
        session_config: ``SessionOptions`` config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` when sharing cores with other work.
    """

    device: str | list[str] | None = None
    threads: int | None = option(None, minimum=1)
    provider_options: list[dict[str, Any]] | None = None
    session_config: dict[str, Any] | None = None


@dataclass(kw_only=True)
class OnnxDetails(Details):
    """What an ONNX export records per component: its opset, whether weights are external data, and
    whether ``onnx.checker`` passed it (false: ``-o check=false`` skipped the check)."""

    opset: int
    external_data: bool
    checked: bool = True


ONNX = Backend(
    name="onnx", extra="onnx", packages=("onnx", "onnxscript"), runtime_packages=("onnxruntime",),
    precisions=("fp32", "fp16", FULL_INT8), calibrated=(FULL_INT8,),
    calibration_side=CALIBRATION_SIDE, model_file=MODEL_FILE, streams=True,
    export_options=OnnxExportOptions, runtime_options=OnnxRuntimeOptions, details=OnnxDetails,
    exporter="diffship.exporters.onnx", runner="diffship.runtimes.onnxruntime:OrtRunner",
)
