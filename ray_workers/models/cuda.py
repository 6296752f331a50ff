"""How many CUDA devices this process can use (torch's view), asked before a GPU model's pod
starts Ray: a pod that asks for a GPU and sees none (the driver's libraries off the loader
path, no device plugin) must stop and say so, not fall back to the CPU unnoticed. And
which device a model got, by name, for the benchmarks' reports."""

from __future__ import annotations

import os

import torch


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name(device: str) -> str:
    """What a model's device is, for a report: the GPU's name, or the CPU's core count."""
    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(device))
    return f"CPU ({os.cpu_count()} cores)"
