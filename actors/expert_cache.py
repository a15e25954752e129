"""ExpertCacheActor: each distinct LoRA of a search is trained once, whoever asks first.

Trials of a Tune search ask for their experts by input hash (base + expert settings + seed +
data, as ``loramix run`` computes it). The first request launches the trainer; concurrent
requests for the same hash get the same pending result; later ones (and a resumed search)
find the finished adapter on disk. Many top-k values over rank-8 experts train rank 8 once.
"""

from __future__ import annotations

from pathlib import Path

import ray

from loramix.artifact import StageStore


@ray.remote(num_cpus=0)
class ExpertCacheActor:
    """Args:
    root: shared folder; LoRA ``<digest>`` lives in ``root/loras/<digest>/``.
    """

    def __init__(self, root: str):
        self.root = Path(root)
        self.pending: dict[str, ray.ObjectRef] = {}
        self.launched: list[str] = []

    def folder(self, digest: str) -> str:
        return str(self.root / "loras" / digest)

    def get(self, job: str, digest: str, stage_kwargs: dict) -> dict:
        """``{"result": ...}`` when trained, else ``{"ref": ObjectRef}`` of the (shared) training task."""
        from pipelines.run import lora_stage

        done = StageStore(self.folder(digest)).done(job, digest)
        if done is not None:
            return {"result": done}
        if digest not in self.pending:
            kwargs = dict(stage_kwargs, out_dir=str(Path(self.folder(digest)) / "adapter"))
            self.pending[digest] = lora_stage.remote(job, digest, self.folder(digest), **kwargs)
            self.launched.append(f"{job}@{digest}")
        return {"ref": self.pending[digest]}

    def forget(self, digest: str) -> None:
        """Drop a failed training so the next request retries it."""
        self.pending.pop(digest, None)

    def stats(self) -> dict:
        return {"launched": list(self.launched)}
