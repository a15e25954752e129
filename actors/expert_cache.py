"""ExpertCacheActor: each distinct LoRA of a search is trained once, whoever asks first.

Trials of a Tune search ask for their LoRA stages by input digest (the plan's own, as
``loramix run`` computes it). The first request launches the trainer; concurrent requests for
the same digest get the same pending result; later ones (and a resumed search) find the finished
adapter on disk. Many top-k values over rank-8 experts train rank 8 once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray

from actors.stage_tasks import run_lora_stage
from loramix.artifact import StageStore
from loramix.plan import Context, LoraStage, Result


@ray.remote(num_cpus=0)
class ExpertCacheActor:
    """Args:
    root: shared folder; the LoRA of digest ``d`` lives in ``root/loras/<d>/adapter``.
    """

    def __init__(self, root: str):
        self.root = Path(root)
        self.pending: dict[str, ray.ObjectRef] = {}
        self.launched: list[str] = []

    def folder(self, digest: str) -> Path:
        return self.root / "loras" / digest

    def get(self, stage: LoraStage, ctx: Context, digest: str, upstream: list[Result]) -> dict:
        """``{"result": LoraResult}`` when trained, else ``{"ref": ObjectRef}`` of the (shared) training task."""
        folder = self.folder(digest)
        done = StageStore(folder).done(stage.name, digest)
        if done is not None:
            return {"result": stage.result_type.from_json(done)}
        if digest not in self.pending:
            here = dataclasses.replace(ctx, cfg=ctx.cfg.model_copy(update={"output": str(folder)}))
            self.pending[digest] = run_lora_stage.remote(
                dataclasses.replace(stage, out_dir="adapter"), here, digest, None, *upstream
            )
            self.launched.append(f"{stage.name}@{digest}")
        return {"ref": self.pending[digest]}

    def forget(self, digest: str) -> None:
        """Drop a failed training so the next request retries it."""
        self.pending.pop(digest, None)

    def stats(self) -> dict:
        return {"launched": list(self.launched)}
