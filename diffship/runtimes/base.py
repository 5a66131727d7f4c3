"""The runner protocol: ``infer(inputs) -> outputs``, with input checking done once, here.

A backend's runner is the class its record names (``Backend.runner``), a :class:`Runner` subclass built as
``Runner(folder, entry, options)``: the component folder, its manifest entry
(:class:`~diffship.backends.manifest.ComponentEntry`) and the backend's parsed runtime options. It
implements ``_run`` (and, to keep tensors on a device, ``device`` and ``_convert``), and ``close`` when
it holds something worth releasing early. Runners are context managers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from diffship.backends.manifest import ComponentEntry
from diffship.errors import DiffshipError, RuntimeFailure, ShapeError, first_line


class Runner:
    """Runs one exported component.

    Attributes:
        device: where the runner takes inputs and returns outputs. The pipeline adapters report it as
            their module device, so diffusers keeps latents there between steps (a CUDA runner never
            round-trips through the host).

    Args:
        folder: the component folder.
        entry: the component's manifest entry: its IO (``dims`` hold ints for fixed sizes and names for
            symbolic ones) and its backend's details.
        options: the backend's runtime options record.
    """

    device = torch.device("cpu")

    def __init__(self, folder: Path, entry: ComponentEntry, options: Any = None):
        self.folder = Path(folder)
        self.entry = entry
        self.name = entry.component
        self.inputs = list(entry.inputs)
        self.outputs = list(entry.outputs)
        self.details = entry.details
        self.closed = False
        #: what the export accepts, in user terms, appended to shape errors (set by the runner or the
        #: pipeline loader), and what to do about a refused shape.
        self.shape_note = ""
        self.shape_advice = "re-export for this shape or without --static"

    @property
    def input_names(self) -> list[str]:
        return self.entry.input_names

    @property
    def output_names(self) -> list[str]:
        return self.entry.output_names

    def check_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Validate names, ranks and sizes, and convert to the declared dtypes (with :meth:`_convert`).

        Symbolic dims must agree across inputs (one ``batch`` for all); fixed dims must match. An input
        declared as a scalar or as one element (optimum's UNet takes one ``timestep``) accepts one value
        per batch row where all rows hold the same value.

        Raises:
            ShapeError: with the expected and actual shapes.
        """
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise ShapeError(f"{self.name}: expected inputs {self.input_names}, got {list(feeds)}")
        seen: dict[str, tuple[int, str]] = {}
        arrays = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                value = np.asarray(value)
            dims = spec.dims
            if dims in ([], [1]) and value.ndim == 1 and value.shape[0] > 1 and bool((value == value[0]).all()):
                # one value for all rows (optimum's UNet timestep: a scalar, or one element)
                value = value[0] if not dims else value[:1]
            shape = tuple(value.shape)
            if len(shape) != len(dims):
                raise ShapeError(f"{self.name}: input {spec.name} has shape {shape}, "
                                 f"expected {len(dims)} dims {_fmt(dims)}")
            for axis, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want != got:
                    raise ShapeError(
                        f"{self.name}: input {spec.name} has shape {shape}, but this export takes "
                        f"{_fmt(dims)} (axis {axis} is fixed at {want}){self.shape_note}; {self.shape_advice}"
                    )
                if isinstance(want, str):
                    if want in seen and seen[want][0] != got:
                        raise ShapeError(f"{self.name}: dim {want!r} is {seen[want][0]} in {seen[want][1]} but "
                                         f"{got} in {spec.name}")
                    seen.setdefault(want, (got, spec.name))
            arrays[spec.name] = self._convert(value, spec.dtype)
        return arrays

    def _convert(self, value: torch.Tensor | np.ndarray, dtype: str) -> Any:
        """One checked input as the backend takes it: here a contiguous host array of ``dtype``."""
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        # manifest dtype names are numpy's; ascontiguousarray makes a scalar 1-d: keep the shape
        return np.ascontiguousarray(array, dtype=np.dtype(dtype)).reshape(np.shape(array))

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Run the component on ``feeds`` (tensors or arrays by input name); outputs as torch tensors."""
        if self.closed:
            raise RuntimeFailure(f"{self.name}: this runner was closed; load the export again")
        checked = self.check_inputs(feeds)
        try:
            outputs = self._run(checked)
        except DiffshipError:
            raise
        except Exception as exc:  # the backend's own error types, translated once for every backend
            raise RuntimeFailure(f"running {self.name} on {self.describe()} failed: {first_line(exc)}; re-run with "
                                 f"--debug for details") from exc
        return {name: torch.as_tensor(outputs[name]) for name in self.output_names}

    def _run(self, feeds: dict[str, Any]) -> Mapping[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        """Where and how this runner computes, for reports (e.g. "onnxruntime 1.20 CPUExecutionProvider")."""
        return type(self).__name__

    def close(self) -> None:
        """Release what the runner holds (sessions, compiled models, engines); later calls are refused.
        Subclasses that keep state worth saving (a TensorRT-RTX runtime cache) save it here."""
        self.closed = True

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def compute_precision(self) -> str | None:
        """A precision coarser than the export's that this runner computes in (e.g. ``bf16``), which
        parity then judges with that precision's tolerances; None when it computes as exported."""
        return None


def _fmt(dims: list) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"
