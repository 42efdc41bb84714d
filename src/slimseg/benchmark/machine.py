"""What a benchmark ran on: device name, torch version, threads, dtype, attention kernel."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from slimseg.inference.precision import dtype_name
from slimseg.modeling.sam.native_attention import native_kernel_status


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return cpu_name()


def describe_machine(device: torch.device, dtype: torch.dtype | None = None,
                     rel_pos_attention: bool = True) -> dict[str, Any]:
    """device, device_name, cpu, cpu_cores, torch version, torch threads, python, platform,
    (on the CPU, for models with relative-position attention) the attention kernel that runs
    it and (when given) the dtype, as plain JSON values. ``rel_pos_attention=False`` (Lite-SAM)
    leaves the kernel out: it would be built for nothing, and a line naming it would mislead."""
    machine: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        machine["cuda"] = torch.version.cuda
    if device.type == "cpu" and rel_pos_attention:
        machine["attention_kernel"] = native_kernel_status(dtype or torch.float32)
    if dtype is not None:
        machine["dtype"] = dtype_name(dtype)
    return machine


def machine_line(machine: dict[str, Any]) -> str:
    """One human line: ``AMD EPYC (cpu), torch 2.13.0, 2 threads of 2 cores, float32, native
    relative-position attention``."""
    parts = [f"{machine['device_name']} ({machine['device']})", f"torch {machine['torch']}",
             f"{machine['threads']} threads of {machine['cpu_cores']} cores"]
    if "dtype" in machine:
        parts.append(machine["dtype"])
    if "attention_kernel" in machine:
        # "native (AVX2, <library>)" or "torch (<why not native>)": the library's path is noise
        # in one line, the reason for torch is not
        status = machine["attention_kernel"]
        kind, _, reason = status.partition(" (")
        if kind == "native":
            parts.append("native relative-position attention" + (" in float32" if status.endswith(", in float32)") else ""))
        else:
            parts.append(f"{kind} relative-position attention ({reason}")
    return ", ".join(parts)
