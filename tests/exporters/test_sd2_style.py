"""SD 2.x differs from 1.x in the UNet (linear projections, per-block heads, upcast attention), the text
encoder (GELU) and the objective (v-prediction): an SD-2-shaped pipeline exports and passes parity."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.onnx
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def sd2_dir(tmp_path_factory, tiny_pipe):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    config = dict(tiny_pipe.text_encoder.config.to_dict(), hidden_act="gelu")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(type(tiny_pipe.text_encoder.config)(**config)).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=32,
    ).eval()
    scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config, prediction_type="v_prediction",
                                          timestep_spacing="trailing", rescale_betas_zero_snr=True)
    out = tmp_path_factory.mktemp("sd2") / "src"
    StableDiffusionPipeline(**{**tiny_pipe.components, "text_encoder": text_encoder, "unet": unet,
                               "scheduler": scheduler}, requires_safety_checker=False).save_pretrained(out)
    return out


def test_sd2_style_export_passes_parity(sd2_dir, tmp_path):
    from diffship.workflows import export_pipeline
    from diffship.parity.compare import ParitySettings, check_parity
    from diffship.runtimes.pipeline import load_pipeline

    out = tmp_path / "export"
    export_pipeline(sd2_dir, out, components=["text_encoder", "unet"])  # what SD 2 changes (the VAE is SD 1's)
    pipe = load_pipeline(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.use_linear_projection is True
    report = check_parity(sd2_dir, out, settings=ParitySettings(steps=4, guidance_scale=5.0, tasks=("text2img",)))
    assert report.passed, report.failures()
    assert report.settings["scheduler"] == "DDIMScheduler"
    assert min(i.metrics.psnr for i in report.images) >= 40
