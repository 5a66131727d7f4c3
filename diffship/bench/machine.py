"""Facts about the machine a benchmark ran on, recorded with every result so numbers are never
compared across machines by accident; and process memory figures."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

#: instruction-set extensions that decide which kernels libraries pick (vector width, bf16/fp16, AMX).
_ISA_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni", "neon", "asimd", "sve", "fp16", "bf16", "i8mm", "sme")


def _cpuinfo() -> dict[str, str]:
    """First processor's fields of ``/proc/cpuinfo`` (Linux), else empty."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _flags(cpu: dict[str, str]) -> list[str]:
    return (cpu.get("flags") or cpu.get("Features") or "").split()  # x86 / ARM spelling


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in ``/proc/cpuinfo``; None where it cannot tell."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        info = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
        if "core id" in info:
            cores.add((info.get("physical id", "0"), info["core id"]))
    return len(cores) or None


def usable_cpus() -> int | None:
    """Logical CPUs this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine_info(versions: dict[str, str] | None = None) -> dict[str, Any]:
    """CPU model, cores, instruction-set flags, memory, OS, GPU and library versions."""
    import torch

    cpu = _cpuinfo()
    flags = _flags(cpu)
    info: dict[str, Any] = {
        "cpu": cpu.get("model name") or platform.processor() or platform.machine(),
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "usable_cores": usable_cpus(),
        "isa": sorted(f for f in flags if f.startswith(_ISA_PREFIXES)),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions or {},
        "matmul_peak_gflops": matmul_peak_gflops(),
    }
    return info


def matmul_peak_gflops(side: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The machine's measured peak: the best rate of a square ``side`` matmul in eager PyTorch (its CPU
    kernels: oneDNN/MKL), per dtype -- fp32, bf16 where it is native, and int8 (``torch._int_mm``: 8-bit
    operands, 32-bit sums; operations per second) where PyTorch has it here. Achieved GFLOP/s are reported
    against the peak of what a subject computes in, so the distance to the limit is visible; about a second."""
    import time

    import torch

    def rand(dtype):
        if dtype == torch.int8:
            return torch.randint(-128, 128, (side, side), dtype=dtype)
        return torch.randn(side, side, dtype=dtype)

    dtypes = {"fp32": (torch.float32, torch.mm), **({"bf16": (torch.bfloat16, torch.mm)} if bf16_native() else {}),
              "int8": (torch.int8, getattr(torch, "_int_mm", None))}
    peaks = {}
    for name, (dtype, mm) in dtypes.items():
        a, b = rand(dtype), rand(dtype)
        try:
            mm(a, b)  # first call: kernel selection, allocation
        except (TypeError, RuntimeError, NotImplementedError):  # no such kernel in this PyTorch build
            continue
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            mm(a, b)
            times.append(time.perf_counter() - start)
        peaks[name] = round(2 * side**3 / min(times) / 1e9, 1)
    return peaks


def bf16_native(device: str = "cpu") -> bool:
    """Whether eager bf16 runs on native bf16 arithmetic here (AVX512-BF16/AMX on x86, a recent GPU);
    elsewhere PyTorch emulates it, and a bf16 figure would only measure the emulation."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = set(_flags(_cpuinfo()))
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}) or platform.machine() == "arm64" and sys.platform == "darwin"


def peak_rss_bytes(children: bool = False) -> int:
    """Peak resident memory of this process (or of its largest child process: the ONNX checker, the
    TensorRT builder), each as measured in that process (``VmHWM`` on Linux).

    Not ``getrusage``'s ``ru_maxrss`` where there is better: Linux keeps it across ``exec``, so a process
    started by a parent holding 14 GB reported 14 GB whatever it used itself (measured: a child of a
    3 GB parent reported 3.2 GB, its own peak being 14 MB).
    """
    from diffship._isolate import largest_child_rss_bytes, own_peak_rss_bytes

    if children:
        return largest_child_rss_bytes()
    own = own_peak_rss_bytes()
    if own is not None:
        return own
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``/proc``), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")

