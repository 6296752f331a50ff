"""Where a model's replicas run on this machine: on the GPUs its catalogue entry asks for
(`resources.gpus`) when the machine has them, else on the CPU.

Ray hides every GPU from an actor that reserves none (CUDA_VISIBLE_DEVICES is emptied),
so a model must reserve its GPUs to see them; and a replica that reserves more than the
machine has never starts, so the replicas are capped at what the GPUs hold. A replica of a
model with `resources.processes_per_gpu` is that many Serve replicas sharing its GPU, as in
a pod, so the autoscaler's counts mean the same here and under KEDA. Pure: the launcher
reads the node's GPU count from Ray and applies the answer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPlacement:
    gpus_per_replica: float
    # Most replicas the machine's GPUs hold; None: no GPU bound.
    max_replicas: int | None
    # What an operator should read at start; None when there is nothing to say.
    note: str | None
    # Serve replicas (processes) per replica, sharing its GPUs.
    processes: int = 1

    def serve_replicas(self, replicas: int) -> int:
        return replicas * self.processes

    @property
    def gpus_per_process(self) -> float:
        return self.gpus_per_replica / self.processes


def gpu_placement(model: str, wanted_gpus: int, node_gpus: float, processes_per_gpu: int = 1) -> GpuPlacement:
    if wanted_gpus == 0:
        return GpuPlacement(0.0, None, None)
    if node_gpus >= wanted_gpus:
        fits = int(node_gpus // wanted_gpus)
        note = f"worker {model}: {wanted_gpus} GPU(s) per replica, at most {fits} on {node_gpus:g} GPU(s)"
        if processes_per_gpu > 1:
            note += f", {processes_per_gpu} processes sharing each"
        return GpuPlacement(float(wanted_gpus), fits, note, processes_per_gpu)
    note = f"worker {model}: asks for {wanted_gpus} GPU(s), this machine has {node_gpus:g}: it runs on CPU"
    return GpuPlacement(0.0, None, note)
