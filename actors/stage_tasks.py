"""The plan's stages as Ray tasks: one remote wrapper for every stage, one for LoRA stages.

A task receives the stage (a small frozen dataclass), the :class:`~loramix.plan.Context` and its
upstream results (Ray resolves them), runs the core body and marks the stage done. LoRA stages run
on 0 CPUs: they tokenise and then wait on their ``TorchTrainer``, whose workers hold the resources.
"""

from __future__ import annotations

import ray

from actors.lora_trainer import fit_lora
from loramix import stages
from loramix.plan import Context, LoraStage, Result, Stage


def poster(progress, every: int = 5):
    """``progress(job, total) -> report`` that posts every few steps to the ProgressActor (the driver's bars)."""

    def factory(job: str, total: int):
        def report(metrics: dict, ckpt=None) -> None:
            if metrics["step"] % every == 0 or metrics["step"] == total:
                progress.update.remote(job, metrics["step"], total, metrics["loss"])

        return report

    return factory


@ray.remote
def run_stage(stage: Stage, ctx: Context, digest: str, progress, *upstream: Result) -> Result:
    result = stage.run(ctx, dict(zip(stage.deps, upstream)), poster(progress))
    ctx.store.mark(stage.name, digest, result.to_json(), result.outputs())
    return result


@ray.remote(num_cpus=0)
def run_lora_stage(stage: LoraStage, ctx: Context, digest: str, progress, *upstream: Result) -> Result:
    inputs = dict(zip(stage.deps, upstream))
    spec = stages.lora_spec(ctx, stage, inputs)
    result = fit_lora(spec, ctx.cfg, inputs["base"], f"{stage.name.replace('/', '-')}-{digest}", progress)
    ctx.store.mark(stage.name, digest, result.to_json(), result.outputs())
    return result


def resources(ctx: Context) -> dict:
    """A non-LoRA stage task: one CPU, and a GPU with ``resources.use_gpu``."""
    return {"num_cpus": 1, "num_gpus": 1 if ctx.cfg.resources.use_gpu else 0}


def launch(stage: Stage, ctx: Context, digest: str, progress, upstream: list) -> ray.ObjectRef:
    """Submit one stage with its upstream results (values or refs); its old marker goes first, so a
    crash while it rewrites its outputs leaves no marker vouching for them."""
    ctx.store.invalidate(stage.name)
    if stage.kind == "lora":
        return run_lora_stage.remote(stage, ctx, digest, progress, *upstream)
    return run_stage.options(**resources(ctx)).remote(stage, ctx, digest, progress, *upstream)
