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


def fits(nbytes: int, copies: float = 1) -> bool:
    """Whether ``copies`` times ``nbytes`` fit in the memory available (True where it is unknown)."""
    available = available_memory_bytes()
    return available is None or copies * nbytes < available


#: allocations from this size up go straight to the OS and back (glibc's ``M_MMAP_THRESHOLD``, bytes)
RETURNED_FROM = 1 << 20


def return_large_frees() -> bool:
    """Make freed large blocks go back to the OS at once, for a process that reads, converts and drops one
    weight after another (a streamed export); returns whether it could (glibc only). It lasts for the rest of
    the process (every block from 1 MiB is then mapped and unmapped), so the processes that only export call
    it (``diffship export``, bench's export children), not the library's ``export_pipeline``.

    glibc serves a large allocation from its own mapping, but after freeing one it raises its threshold for
    that to the freed size (up to 32 MB) and keeps later blocks below it in its heap, which grows and is
    not returned: a FLUX.1-dev transformer export through OpenVINO peaked at 6.8 GB this way, and at 1.6 GB
    with the threshold fixed (a fixed value also stops the raising).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, RETURNED_FROM))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


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


#: bytes per value once loaded: diffusers and transformers load float weights as float32 unless told otherwise.
_LOADED_BYTES = {"F64": 8, "F32": 4, "F16": 4, "BF16": 4, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_values(path: Path) -> dict[str, int]:
    """Values per dtype in one safetensors file, from its header alone (no weights are read).

    Raises:
        ValueError: the file is not a readable safetensors file.
    """
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100_000_000:
            raise ValueError(f"{path}: a safetensors header of {size} bytes")
        header = json.loads(f.read(size))
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for d in info["shape"]:
            n *= d
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    return counts


def loading_bytes(folder: Path) -> int:
    """Memory the eager pipeline of a diffusers ``folder`` takes once loaded, estimated from its
    safetensors headers: float weights become float32 (so a bf16 checkpoint takes twice its size)."""
    total = 0
    for path in Path(folder).rglob("*.safetensors"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        try:
            counts = safetensors_values(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # loading it reports what is wrong with it
        total += sum(n * _LOADED_BYTES.get(dtype, 4) for dtype, n in counts.items())
    return total
