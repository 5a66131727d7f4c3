"""One image from an exported pipeline, loaded by diffship or by optimum: ``scripts/interop-check`` compares them.

Usage: python scripts/interop_generate.py LOADER FOLDER OUT.npy, LOADER one of diffship, optimum-onnx,
optimum-intel. Runs with whichever environment has the loader (diffship's venv, or the interop venv with
optimum and transformers 4).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

PROMPT = "a photograph of an astronaut riding a horse"


def load(loader: str, folder: str):
    if loader == "diffship":
        from diffship.runtimes.pipeline import load_pipeline

        return load_pipeline(folder)
    if loader == "optimum-onnx":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        return ORTStableDiffusionPipeline.from_pretrained(folder)
    if loader == "optimum-intel":
        from optimum.intel import OVStableDiffusionPipeline

        # fp32 inference: OpenVINO's CPU plugin would compute in bf16 where the CPU has it.
        return OVStableDiffusionPipeline.from_pretrained(folder, compile=True, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    raise SystemExit(f"unknown loader {loader!r}")


def main() -> None:
    loader, folder, out = sys.argv[1:4]
    pipe = load(loader, folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, num_inference_steps=4, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    np.save(out, np.asarray(image, dtype=np.float32))
    print(f"{loader}: {type(pipe).__name__} from {folder}: image {image.shape}")


if __name__ == "__main__":
    main()
