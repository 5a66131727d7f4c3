"""Mixed-bit palettization: k-means palettes, and widths chosen by measured sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from diffship.backends.coreml import CoreMLExportOptions
from diffship.configs.fields import parse
from diffship.errors import OptionError
from diffship.exporters.palettes import UNCOMPRESSED, choose_bits, covered, kmeans_palette, palettize


def test_kmeans_palette_uses_its_width_and_beats_a_uniform_grid():
    values = np.random.default_rng(0).standard_normal((64, 80)).astype(np.float32)
    for nbits in (1, 2, 4):
        got = kmeans_palette(values, nbits)
        assert got.shape == values.shape and got.dtype == values.dtype
        assert len(np.unique(got)) <= 2 ** nbits
        grid = np.linspace(values.min(), values.max(), 2 ** nbits)
        uniform = grid[np.abs(values[..., None] - grid).argmin(-1)]
        assert np.mean((got - values) ** 2) < np.mean((uniform - values) ** 2)
    four = np.array([-1.0, 0.5, 2.0, 7.0] * 100, dtype=np.float32)
    np.testing.assert_array_equal(kmeans_palette(four, 2), four)


def test_grouped_palettes_have_one_palette_per_group_of_output_channels():
    weight = np.random.default_rng(1).standard_normal((32, 16, 3, 3)).astype(np.float32)
    weight[16:] *= 10  # groups with different ranges: one palette for all fits neither well
    grouped, whole = palettize(weight, 2, group_size=8), palettize(weight, 2)
    for start in range(0, 32, 8):
        assert len(np.unique(grouped[start:start + 8])) <= 4
    assert len(np.unique(grouped)) > 4
    assert np.mean((grouped - weight) ** 2) < np.mean((whole - weight) ** 2)


class TwoBranches(nn.Module):
    """out = loud(x) + quiet(x): palette noise in ``loud`` weighs 100x more in the output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Linear(64, 64), nn.Linear(64, 64)
        with torch.no_grad():
            self.loud.weight.mul_(10)

    def forward(self, x):
        return self.loud(x) + self.quiet(x)


def test_sensitive_weights_get_more_bits_and_the_target_holds():
    module = TwoBranches().eval()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    samples = [(torch.randn(8, 64, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    low, high = (choose_bits(module, samples, target, (2, 4, 6, 8)) for target in (30.0, 45.0))
    assert set(low.bits) == {"loud.weight", "quiet.weight"}  # biases are under the size threshold
    for choice, target in ((low, 30.0), (high, 45.0)):
        assert choice.psnr >= target and choice.samples == 2
        assert choice.bits["loud.weight"] > choice.bits["quiet.weight"]
    assert high.average_bits > low.average_bits
    for name, param in module.named_parameters():  # the search leaves the module as it found it
        torch.testing.assert_close(param, before[name], atol=0, rtol=0)


def test_an_unreachable_target_leaves_the_weights_uncompressed():
    module = TwoBranches().eval()
    samples = [(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)),)]
    choice = choose_bits(module, samples, 140.0, (4, 8))
    assert set(choice.bits.values()) == {UNCOMPRESSED} and choice.average_bits == UNCOMPRESSED
    assert len(covered(module)) == 2


@pytest.mark.parametrize("options, message", [
    ({"palette_granularity": "per_grouped_channel"}, "need Core ML of iOS 18 / macOS 15; add -o deployment_target=iOS18"),
    ({"palette_bits": "3,4"}, "3-bit palettes need Core ML of iOS 18"),
    ({"palette_bits": "2,5"}, "palette_bits takes widths among 1, 2, 3, 4, 6, 8, got \\[2, 5\\]"),
    ({"target_psnr": 5}, "target_psnr must be 10.0-150.0"),
])
def test_palette_options_are_refused_where_core_ml_cannot_read_them(options, message):
    with pytest.raises(OptionError, match=message):
        parse(CoreMLExportOptions, options, "coreml export option", error=OptionError)


def test_palette_options_parse_from_the_command_line():
    opts = parse(CoreMLExportOptions, {"palette_bits": "2,3", "palette_granularity": "per_grouped_channel",
                                       "deployment_target": "iOS18"}, "coreml export option", error=OptionError)
    assert opts.palette_bits == (2, 3) and opts.group_size == 16
    assert parse(CoreMLExportOptions, {"palette_bits": 4}, "x", error=OptionError).palette_bits == (4,)
    assert CoreMLExportOptions().group_size is None
