"""ProgressActor: where workers post their step and loss, the driver reads them for its bars, and
the driver stops a run's stages (the stop flag every stage task polls)."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class ProgressActor:
    """Per-job progress board: ``{job: (step, total, loss)}``, the nodes each job's workers ran on,
    the stage tasks running now, and whether the run was stopped."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[int, int, float]] = {}
        self.nodes: dict[str, dict[int, str]] = {}
        self.pids: dict[str, dict[int, int]] = {}
        self.running: set[str] = set()
        self.stop_reason: str | None = None

    def update(self, job: str, step: int, total: int, loss: float) -> None:
        self.jobs[job] = (step, total, loss)

    def worker(self, job: str, rank: int, node_id: str, pid: int) -> None:
        self.nodes.setdefault(job, {})[rank] = node_id
        self.pids.setdefault(job, {})[rank] = pid

    def begin(self, stage: str) -> str | None:
        """A stage task starts: None lets it run; else the reason the run was stopped (it must not start)."""
        if self.stop_reason is None:
            self.running.add(stage)
        else:  # Ray's retry of a task whose worker died: its earlier attempt is over
            self.running.discard(stage)
        return self.stop_reason

    def end(self, stage: str) -> None:
        self.running.discard(stage)

    def stop(self, reason: str) -> None:
        """Stop the run: stages not started yet refuse to start, running trainers are aborted."""
        self.stop_reason = self.stop_reason or reason

    def stopped(self) -> str | None:
        return self.stop_reason

    def snapshot(self) -> dict:
        return {
            "jobs": dict(self.jobs),
            "nodes": {k: dict(v) for k, v in self.nodes.items()},
            "pids": {k: dict(v) for k, v in self.pids.items()},
            "running": sorted(self.running),
            "stopped": self.stop_reason,
        }
