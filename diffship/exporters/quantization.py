"""Full 8-bit quantization of the denoiser, shared by the backends that have it (``full-int8``).

Both the weights and the activations of the convolutions and matrix products become 8-bit, so the
runtime's integer kernels (VNNI, AMX) run them; ranges come from inputs recorded in eager runs of the
pipeline. Some layers cost far more image quality than the rest when quantized. Which ones differs per
model, so it is measured, not assumed: the denoiser is quantized once with every layer group quantized
and once per *group* kept float, each scored by the PSNR of its outputs against the float graph's on
recorded calls held out of calibration; a group whose keeping gains at least :data:`MIN_GAIN_DB` stays
float in the export. The groups (:data:`GROUPS`) are those the literature and the anchors single out:
the first and last layers, the time (and added-condition) embedding, and the attention score products.

The VAE decoder (a component with ``int8_activations``) is quantized the same way, with one more test:
its images on the held-out calls (outputs clipped to [-1, 1]) must reach
:data:`~diffship.backends.quantized.MIN_PASSING_DB` against the float graph's, else its activations stay float. The denoiser has no such floor: quantizing it is what ``full-int8`` asks for.

A backend supplies the graph's nodes as :class:`QuantNode` records (its own node name, op kind, module
path) and two functions -- quantize with some nodes left float, and run -- and this module does the rest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from diffship.backends.quantized import GROUPS

log = logging.getLogger(__name__)

#: a group is kept float when keeping it raises the denoiser's output PSNR by at least this much.
MIN_GAIN_DB = 1.0
#: recorded calls scored (held out of calibration): every ``HOLDOUT_EVERY``-th, at most ``MAX_SCORED``.
HOLDOUT_EVERY = 4
MAX_SCORED = 8
#: calls the measuring quantizations calibrate on (each one quantizes the whole denoiser).
MAX_MEASURING = 16
#: modules at the denoiser's top level that are its first or last layer (UNet, MMDiT / Flux transformer).
_ENDS = {"conv_in", "conv_out", "pos_embed", "x_embedder", "context_embedder", "proj_out", "norm_out",
         "post_quant_conv"}
#: the module that holds a VAE decoder's layers below the VAE (``decoder.conv_in`` is a first layer).
_DECODER_ROOT = "decoder"
#: modules, anywhere, that compute or project the timestep (and SDXL's added) conditioning.
_TIME = {"time_embedding", "time_proj", "add_embedding", "add_time_proj", "time_emb_proj", "time_text_embed"}


@dataclass(frozen=True)
class QuantNode:
    """One node of the graph being quantized, as the backend names it.

    Attributes:
        name: the backend's node name (what its ignored-node lists take).
        op: ``conv``, ``matmul`` (with a weight), ``scores`` (a product of two activations) or ``softmax``.
        path: the module path below the denoiser's root (``("down_blocks", "0", "attentions", ...)``).
    """

    name: str
    op: str
    path: tuple[str, ...]


def upstream(starts: Sequence[Any], name: Callable[[Any], str], sources: Callable[[Any], Sequence[Any]]) -> set[str]:
    """Names of ``starts`` and of every node they are computed from (``sources``: a node's producers):
    the *precise* nodes of a graph, taking its sines and cosines as ``starts``."""
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if (key := name(node)) in seen:
            continue
        seen.add(key)
        stack.extend(sources(node))
    return seen


def group_of(node: QuantNode) -> str | None:
    """The group of :data:`GROUPS` ``node`` belongs to, or None."""
    if node.op in ("scores", "softmax"):
        return "attention-scores"
    path = node.path[1:] if node.path[:1] == (_DECODER_ROOT,) else node.path
    if path and path[0] in _ENDS:  # the top level only: attention blocks have a proj_out too
        return "ends"
    if any(part in _TIME for part in node.path):
        return "time-embedding"
    return None


def groups(nodes: Sequence[QuantNode]) -> dict[str, set[str]]:
    """Node names per group (groups without nodes left out)."""
    out: dict[str, set[str]] = {}
    for node in nodes:
        if (group := group_of(node)) is not None:
            out.setdefault(group, set()).add(node.name)
    return out


def split_calls(calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Recorded calls as (calibration, scored) for the measuring quantizations: every
    :data:`HOLDOUT_EVERY`-th call is held out to score on (at most :data:`MAX_SCORED`), and of the rest at
    most :data:`MAX_MEASURING` spread over the run calibrate (the export's own quantization takes all);
    with fewer than 2 calls both get all of them."""
    if len(calls) < 2:
        return calls, calls
    scored = calls[HOLDOUT_EVERY - 1::HOLDOUT_EVERY][:MAX_SCORED] or calls[-1:]
    held = {id(c) for c in scored}
    rest = [c for c in calls if id(c) not in held]
    step = max(1, -(-len(rest) // MAX_MEASURING))
    return rest[::step], scored


def psnr(expected: list[np.ndarray], actual: list[np.ndarray], value_range: tuple[float, float] | None = None) -> float:
    """PSNR (dB) of ``actual`` against ``expected`` over all outputs, peak = the expected range; with
    ``value_range`` (an image's), both clipped to it and peak = its width."""
    exp = np.concatenate([np.asarray(e, np.float64).ravel() for e in expected])
    act = np.concatenate([np.asarray(a, np.float64).ravel() for a in actual])
    if not np.all(np.isfinite(act)):
        return -math.inf
    if value_range is not None:
        exp, act = np.clip(exp, *value_range), np.clip(act, *value_range)
    mse = float(np.mean((exp - act) ** 2))
    peak = float(value_range[1] - value_range[0]) if value_range else float(exp.max() - exp.min()) or 1.0
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` measured and decided.

    Attributes:
        kept: the groups kept float.
        scores: PSNR (dB) of the component's outputs against the float graph's: ``all quantized``, and per
            group with that group kept float (rounded to 0.1 dB, as the manifest records them).
        reached: with a floor, the PSNR (dB) the chosen quantization reached; None without one.
        floor: the PSNR (dB) it had to reach (:func:`choose`'s ``floor``), or None.
    """

    kept: tuple[str, ...]
    scores: dict[str, float]
    reached: float | None = None
    floor: float | None = None

    @property
    def passed(self) -> bool:
        """False where the quantization stayed under its floor: the component's activations stay float."""
        return self.floor is None or (self.reached is not None and self.reached >= self.floor)

    def describe(self) -> str:
        """One line for the manifest and the log."""
        kept = ", ".join(self.kept) or "none"
        gains = "; ".join(f"{k} {v:.1f} dB" for k, v in self.scores.items())
        line = f"kept float: {kept}" + (f" (measured output PSNR: {gains})" if gains else "")
        return line if self.passed else f"{self.refusal()}; {line}"

    def refusal(self) -> str:
        """Why the activations stayed float (for a choice that did not pass)."""
        return (f"8-bit activations left float: its outputs reached {self.reached:.1f} dB against the float "
                f"graph's on a held-out call, under the {self.floor:.0f} dB floor")


def recorded(choice: Choice, details: Any, component: str) -> bool:
    """Record ``choice`` in a manifest entry's ``details`` (a :class:`~diffship.backends.base.Details`) and
    return whether the component keeps its 8-bit activations: the measured scores always; the kept groups
    where it passed, else why its activations stay float (also logged)."""
    details.quantized_psnr = choice.scores or None
    if choice.passed:
        details.kept_float = list(choice.kept)
        return True
    details.float_activations = choice.refusal()
    log.info("%s: %s", component, details.float_activations)
    return False


def choose(nodes: Sequence[QuantNode], keep: tuple[str, ...] | None,
           score: Callable[[set[str]], float], progress: Callable[[str], None] | None = None,
           floor: float | None = None) -> tuple[Choice, set[str]]:
    """Decide which groups stay float and return the choice with the node names to leave float.

    Args:
        nodes: the graph's quantizable nodes.
        keep: groups asked for (``-o keep_float``), or None to measure (:data:`MIN_GAIN_DB`).
        score: quantizes with the given node names left float and returns its output PSNR.
        progress: told before each measurement.
        floor: when measuring, the PSNR (dB) the chosen quantization must reach (:data:`~diffship.backends.quantized.MIN_PASSING_DB`
            for the VAE decoder); the choice says whether it did (``passed``).
    """
    by_group = groups(nodes)
    if keep is not None:
        kept = tuple(g for g in keep if g in by_group)
        return Choice(kept, {}), set().union(*(by_group[g] for g in kept))
    say = progress or (lambda _: None)
    say(f"measuring which layer groups to keep float ({len(by_group) + 1} quantizations)")
    scores = {"all quantized": score(set())}
    for group, names in by_group.items():
        say(f"measuring {group} kept float")
        scores[group] = score(names)
    base = scores["all quantized"]
    kept = tuple(g for g in by_group if scores[g] - base >= MIN_GAIN_DB)
    rounded = {k: round(v, 1) if math.isfinite(v) else v for k, v in scores.items()}
    names = set().union(*(by_group[g] for g in kept))
    if floor is None:
        return Choice(kept, rounded), names
    if len(kept) > 1:
        say(f"measuring {', '.join(kept)} kept float")
    reached = scores[kept[0]] if len(kept) == 1 else score(names) if kept else base
    return Choice(kept, rounded, round(reached, 1) if math.isfinite(reached) else reached, floor), names
