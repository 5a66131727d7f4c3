"""Loading original (LDM) single-file checkpoints through ``diffship.reference.load``.

The checkpoints are written from the ``tiny`` preset by ``ldm_checkpoint.py``, so no model is downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from diffship.errors import SourceError
from diffship.reference import tiny_path
from diffship.reference.loader import load

# The helper sits next to this file; tests/ has no __init__.py, so put its folder on the path explicitly
# (works with any pytest --import-mode).
sys.path.insert(0, str(Path(__file__).parent))
from ldm_checkpoint import ldm_state_dict, save_ldm_checkpoint  # noqa: E402

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Keep every test off the network.

    diffusers' ``from_single_file`` ignores ``local_files_only=True`` when the configs are not cached and
    retries with downloads on. huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, so setting the
    variable alone does not reach this process; patch the module constant too.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    return save_ldm_checkpoint(tiny, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _assert_same_weights(a, b):
    for name in COMPONENTS:
        pa, pb = dict(getattr(a, name).named_parameters()), dict(getattr(b, name).named_parameters())
        assert pa.keys() == pb.keys(), name
        different = [k for k in pa if not torch.equal(pa[k], pb[k])]
        assert not different, f"{name}: {different[:5]}"


def _images(pipe):
    out = pipe("a tiny red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    return out.images


def test_checkpoint_has_original_layout(checkpoint):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    sd = load_file(str(checkpoint))
    assert {k.split(".")[0] for k in sd} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as in SD 1.x files
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in sd
    assert infer_diffusers_model_type(sd) == "v1"


def test_round_trip(tiny, checkpoint):
    pipe2 = load(checkpoint, config=tiny_path())
    assert type(pipe2).__name__ == "StableDiffusionPipeline"
    _assert_same_weights(tiny, pipe2)
    assert (_images(tiny) == _images(pipe2)).all()


def test_config_folder_needs_no_weights(tiny, checkpoint, tmp_path):
    # --config is about configs: a folder without weight files must do, and every weight must then come
    # from the checkpoint (diffusers falls back to a config folder's weights for some components).
    configs = tmp_path / "configs"
    shutil.copytree(tiny_path(), configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    _assert_same_weights(tiny, load(checkpoint, config=configs))


def test_without_config_asks_for_it(checkpoint):
    start = time.monotonic()
    with pytest.raises(SourceError, match="--config"):
        load(checkpoint)
    assert time.monotonic() - start < 30  # offline must fail fast, not wait on network timeouts


@pytest.fixture(scope="module")
def pickle_checkpoint(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny)}, path)
    return path


def test_pickle_refused_without_allow_pickle(pickle_checkpoint):
    with pytest.raises(SourceError, match="--allow-pickle"):
        load(pickle_checkpoint, config=tiny_path())


def test_pickle_loads_with_allow_pickle(tiny, pickle_checkpoint):
    _assert_same_weights(tiny, load(pickle_checkpoint, config=tiny_path(), allow_pickle=True))


class _Payload:
    """Pickles as a call to ``os.mkdir``: runs on load unless torch.load uses ``weights_only=True``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_code_never_runs(tiny, tmp_path):
    # allow_pickle promises torch.load(weights_only=True): an object that executes code is refused.
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": ldm_state_dict(tiny), "payload": _Payload(marker)}, path)
    with pytest.raises(SourceError, match="could not read the checkpoint"):
        load(path, config=tiny_path(), allow_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("name, content", [("notes.txt", "not a model"), ("broken.safetensors", "not a model")])
def test_not_a_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SourceError, match="could not read the checkpoint|neither a diffusers folder nor a checkpoint"):
        load(path, config=tiny_path())


def test_missing_path(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load(tmp_path / "missing.safetensors", config=tiny_path())
