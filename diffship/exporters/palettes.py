"""Mixed-bit palettization: a bit width per weight, chosen by how much each weight's palette costs.

Apple's recipe for Stable Diffusion on Core ML (mixed-bit palettization, "MBP") measures, weight by
weight, how far the model's output moves when only that weight is palettized to 1, 2, 4, 6 or 8 bits,
then gives the robust weights few bits and the sensitive ones many. diffship does the same in PyTorch
before conversion, on the inputs the component really receives (the denoiser's calls recorded from
eager runs of the pipeline; seeded example inputs for the other components):

1. **Sensitivity**: for each weight above the size threshold and each candidate width, the output's
   noise (mean squared error over the squared value range of the eager output, per output) with only
   that weight palettized (k-means, as coremltools palettizes).
2. **Choice**: noise from different weights adds up about independently, so a greedy search lowers one
   weight by one width at a time -- the step that costs the least noise per byte saved -- while the
   predicted total stays within the target PSNR.
3. **Check**: every chosen palette is applied at once and the output measured; while the measured PSNR
   misses the target, the search is repeated with a tighter budget. The measured figure is recorded.

A weight may stay uncompressed (16 bits) when no width keeps the target. The result names weights
by their ``torch`` parameter; the exporter maps them onto the Core ML program's constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

#: bits of an uncompressed (fp16) weight.
UNCOMPRESSED = 16
#: coremltools palettizes weights with more elements than this (its ``weight_threshold`` default).
MIN_SIZE = 2048
#: how often the search is tightened when the measured PSNR misses the target.
ROUNDS = 5


@dataclass(frozen=True)
class Choice:
    """The outcome of a mixed-bit search.

    Attributes:
        bits: torch parameter name -> bits (``UNCOMPRESSED`` where a weight stays fp16).
        psnr: the output PSNR (dB, worst output) measured with every chosen palette applied.
        average_bits: bits per element over the weights the search covered.
        samples: how many inputs the PSNR was measured on.
    """

    bits: dict[str, int]
    psnr: float
    average_bits: float
    samples: int


def kmeans_palette(values: np.ndarray, nbits: int, iterations: int = 25) -> np.ndarray:
    """``values`` with each element replaced by the nearest of ``2**nbits`` k-means centres (1-D Lloyd).

    Centres start at quantiles and move to the means of their clusters; on sorted values each cluster
    is a contiguous run, so an iteration is a search per boundary and a cumulative sum.
    """
    flat = values.astype(np.float64).ravel()
    order = np.sort(flat)
    k = min(2 ** nbits, len(np.unique(order)))
    centres = np.quantile(order, (np.arange(k) + 0.5) / k)
    sums = np.concatenate([[0.0], np.cumsum(order)])
    for _ in range(iterations):
        edges = np.searchsorted(order, (centres[1:] + centres[:-1]) / 2)
        starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [len(order)]])
        counts = stops - starts
        moved = np.where(counts > 0, (sums[stops] - sums[starts]) / np.maximum(counts, 1), centres)
        moved = np.sort(moved)
        if np.allclose(moved, centres, rtol=0, atol=1e-12):
            break
        centres = moved
    index = np.clip(np.searchsorted((centres[1:] + centres[:-1]) / 2, flat), 0, len(centres) - 1)
    return centres[index].astype(values.dtype).reshape(values.shape)


def palettize(weight: np.ndarray, nbits: int, group_size: int | None = None) -> np.ndarray:
    """One palette for the whole weight, or (``group_size``) one per group of that many output channels."""
    if not group_size or weight.ndim < 2:
        return kmeans_palette(weight, nbits)
    out = np.empty_like(weight)
    for start in range(0, weight.shape[0], group_size):
        out[start:start + group_size] = kmeans_palette(weight[start:start + group_size], nbits)
    return out


def covered(module: nn.Module, min_size: int = MIN_SIZE) -> dict[str, nn.Parameter]:
    """The weights a palettization touches: floating-point parameters of more than ``min_size`` elements."""
    return {name: p for name, p in module.named_parameters() if p.is_floating_point() and p.numel() > min_size}


class _Probe:
    """Runs ``module`` on fixed inputs and measures output noise against its unmodified outputs."""

    def __init__(self, module: nn.Module, samples: list[tuple[torch.Tensor, ...]]):
        self.module, self.samples = module, samples
        self.reference = [self._outputs(s) for s in samples]
        # Signal range per output, over all samples (as parity's PSNR: the eager output's range).
        count = len(self.reference[0])
        self.ranges = np.array([max(max(float(r[i].max() - r[i].min()) for r in self.reference), 1e-12) ** 2
                                for i in range(count)])

    def _outputs(self, sample: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        with torch.inference_mode():
            out = self.module(*sample)
        return [t.float() for t in ((out,) if isinstance(out, torch.Tensor) else out)]

    def noise(self) -> np.ndarray:
        """Per output: mean squared error over all samples / squared value range."""
        errors = np.zeros(len(self.ranges))
        for sample, reference in zip(self.samples, self.reference):
            for i, (out, ref) in enumerate(zip(self._outputs(sample), reference)):
                errors[i] += float(torch.mean((out - ref) ** 2))
        return errors / len(self.samples) / self.ranges


def psnr(noise: np.ndarray) -> float:
    """dB for a noise vector (its worst output); infinite when there is none."""
    worst = float(np.max(noise))
    return math.inf if worst <= 0 else -10 * math.log10(worst)


def choose_bits(module: nn.Module, samples: list[tuple[torch.Tensor, ...]], target_psnr: float,
                widths: tuple[int, ...], group_size: int | None = None, min_size: int = MIN_SIZE,
                progress: Callable[[str], None] | None = None) -> Choice:
    """Choose a palette width per weight of ``module`` so its outputs keep ``target_psnr`` on ``samples``.

    The module's weights are modified during the search and restored before it returns.
    """
    weights = covered(module, min_size)
    original = {name: p.detach().clone() for name, p in weights.items()}
    probe = _Probe(module, samples)
    widths = tuple(sorted(set(widths), reverse=True))
    palettes: dict[tuple[str, int], np.ndarray] = {}
    sensitivity: dict[str, dict[int, np.ndarray]] = {}
    try:
        for done, (name, param) in enumerate(weights.items()):
            if progress and done % 20 == 0:
                progress(f"mixed-bit palettes: measuring weight {done + 1}/{len(weights)}")
            sensitivity[name] = {UNCOMPRESSED: np.zeros(len(probe.ranges))}
            for bits in widths:
                palettes[name, bits] = palettize(original[name].numpy(), bits, group_size)
                with torch.no_grad():
                    param.copy_(torch.from_numpy(palettes[name, bits]))
                sensitivity[name][bits] = probe.noise()
            with torch.no_grad():
                param.copy_(original[name])
        sizes = {name: p.numel() for name, p in weights.items()}
        budget = 10 ** (-target_psnr / 10)
        chosen, measured = {name: UNCOMPRESSED for name in weights}, psnr(np.zeros(1))
        for _ in range(ROUNDS):
            bits = _greedy(sensitivity, sizes, widths, budget)
            with torch.no_grad():
                for name, b in bits.items():
                    weights[name].copy_(original[name] if b == UNCOMPRESSED else torch.from_numpy(palettes[name, b]))
            got = psnr(probe.noise())
            if got >= target_psnr:
                chosen, measured = bits, got
                break
            # Noise did not add up as predicted: shrink the budget by the miss, with room to spare.
            budget *= 10 ** ((got - target_psnr) / 10) * 0.8
    finally:
        with torch.no_grad():
            for name, value in original.items():
                weights[name].copy_(value)
    total = sum(sizes.values()) or 1
    return Choice(bits=chosen, psnr=measured, samples=len(samples),
                  average_bits=sum(chosen[n] * sizes[n] for n in chosen) / total)


def _greedy(sensitivity: dict[str, dict[int, np.ndarray]], sizes: dict[str, int], widths: tuple[int, ...],
            budget: float) -> dict[str, int]:
    """Lower one weight by one width at a time, cheapest noise per byte first, within ``budget``."""
    ladder = (UNCOMPRESSED, *widths)
    level = {name: 0 for name in sizes}
    total = np.zeros_like(next(iter(sensitivity.values()))[UNCOMPRESSED]) if sensitivity else np.zeros(1)
    while True:
        best, best_score = None, math.inf
        for name, at in level.items():
            if at + 1 >= len(ladder):
                continue
            now, nxt = ladder[at], ladder[at + 1]
            added = sensitivity[name][nxt] - sensitivity[name][now]
            if np.max(total + added) > budget:
                continue
            score = max(float(np.max(added)), 0.0) / (sizes[name] * (now - nxt))
            if score < best_score:
                best, best_score = name, score
        if best is None:
            return {name: ladder[at] for name, at in level.items()}
        at = level[best]
        total = total + sensitivity[best][ladder[at + 1]] - sensitivity[best][ladder[at]]
        level[best] = at + 1
