"""How many CUDA devices this process can use (torch's view), asked before a GPU model's pod
starts Ray: a pod that asks for a GPU and sees none (the driver's libraries off the loader
path, no device plugin) must stop and say so, not fall back to the CPU unnoticed."""

from __future__ import annotations

import torch


def cuda_devices() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
