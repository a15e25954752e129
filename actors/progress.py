"""ProgressActor: where workers post their step and loss, and the driver reads them for its bars."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    """Per-job progress board: ``{job: (step, total, loss)}`` plus the nodes each job's workers ran on."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[int, int, float]] = {}
        self.nodes: dict[str, dict[int, str]] = {}
        self.pids: dict[str, dict[int, int]] = {}

    def update(self, job: str, step: int, total: int, loss: float) -> None:
        self.jobs[job] = (step, total, loss)

    def worker(self, job: str, rank: int, node_id: str, pid: int) -> None:
        self.nodes.setdefault(job, {})[rank] = node_id
        self.pids.setdefault(job, {})[rank] = pid

    def snapshot(self) -> dict:
        return {
            "jobs": dict(self.jobs),
            "nodes": {k: dict(v) for k, v in self.nodes.items()},
            "pids": {k: dict(v) for k, v in self.pids.items()},
        }
