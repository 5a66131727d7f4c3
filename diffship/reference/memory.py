"""How much memory a component needs at a request shape, estimated from its config before any work.

A static export fixes the size the exported graphs run at; one whose single largest tensor cannot fit in
this machine's memory can never run, so it is refused before minutes of exporting (with the size it
would take). The estimate is a lower bound: the largest one tensor one call computes in fp32 -- the
attention scores at the finest attention level (exported graphs materialise them) or the widest feature
map -- not the whole working set.
"""

from __future__ import annotations

from pathlib import Path

from diffship.reference.shapes import ShapeProfile
from diffship.reference.specs import ComponentSpec

_FLOAT = 4  # bytes of an fp32 value


def available_memory_bytes() -> int | None:
    """Memory available for new work without swapping (``MemAvailable``, Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def largest_tensor(specs: list[ComponentSpec], profile: ShapeProfile) -> tuple[int, str]:
    """Bytes of the largest single tensor any component computes at ``profile``, and what it is."""
    found = [(0, "nothing")]
    for spec in specs:
        cfg, dims = spec.config, spec.dims(profile)
        batch, tokens = dims["batch"], dims["latent_height"] * dims["latent_width"]
        if spec.denoiser and not cfg.get("down_block_types"):
            # a transformer (SD3's MMDiT, Flux): joint attention over the image patches and the text tokens
            patches = next((dims[d] for d in spec.packed), None) or tokens // cfg.get("patch_size", 2) ** 2
            n = patches + dims.get("text_sequence", dims.get("joint_sequence", 0))
            found.append((batch * cfg.get("num_attention_heads", 1) * n * n * _FLOAT,
                          f"{spec.name} attention scores over {n} image and text tokens"))
        elif spec.denoiser:
            heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 1
            for level, kind in enumerate(cfg.get("down_block_types", ())):
                n = tokens // 4**level
                found.append((batch * cfg["block_out_channels"][level] * n * _FLOAT,
                              f"{spec.name} feature map at level {level}"))
                if "Attn" in kind:
                    h = heads[level] if isinstance(heads, (list, tuple)) else heads
                    found.append((batch * h * n * n * _FLOAT,
                                  f"{spec.name} attention scores over {n} latent pixels at level {level}"))
        elif spec.name.startswith("vae"):
            found.append((batch * cfg["block_out_channels"][0] * dims["height"] * dims["width"] * _FLOAT,
                          f"{spec.name} feature map at full size"))
            if cfg.get("mid_block_add_attention", True):
                found.append((batch * tokens * tokens * _FLOAT,
                              f"{spec.name} attention scores over {tokens} latent pixels"))
    return max(found)
