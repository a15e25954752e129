"""The plan's stages as Ray tasks: one remote wrapper for every stage, one for LoRA stages.

A task receives the stage (a small frozen dataclass), the :class:`~loramix.plan.Context` and its
upstream results (Ray resolves them), runs the core body and marks the stage done. LoRA stages run
on 0 CPUs: they tokenise and then wait on their ``TorchTrainer``, whose workers hold the resources.

A run is stopped cooperatively, never with ``ray.cancel``: cancelling a task at the moment it
finishes aborts the driver in Ray 2.60 (task_manager.cc "Check failed: it !=
submissible_tasks_.end()", ray-project/ray#54846). The driver sets the ProgressActor's stop flag; a
stage that has not started refuses to, and a running ``TorchTrainer.fit`` is interrupted the way
Ctrl-C interrupts it (Ray Train then aborts its controller, worker group and placement group).
"""

from __future__ import annotations

import _thread
import signal
import threading
from contextlib import contextmanager

import ray
import torch

from actors.lora_trainer import fit_lora, node_cpus
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


GONE = "the driver that started this run is gone"


class Stopped(RuntimeError):
    """The run this stage belongs to was stopped (another stage failed, Ctrl-C, or nothing could be scheduled)."""


def stop_reason(progress) -> str | None:
    """Why the run was stopped, or None while it goes on. A dead ProgressActor means its driver is gone."""
    return None if progress is None else _ask(progress.stopped)


def _ask(method, *args) -> str | None:
    """``method.remote(*args)``'s answer (a stop reason or None); :data:`GONE` if the actor died."""
    try:
        return ray.get(method.remote(*args))
    except ray.exceptions.RayActorError:
        return GONE


@contextmanager
def stage_running(progress, name: str):
    """Refuse to start a stopped run's stage; tell the driver which stages are running (it waits for them)."""
    if progress is not None:
        reason = _ask(progress.begin, name)
        if reason is not None:
            raise Stopped(f"stage `{name}` not started: the run was stopped ({reason})")
    try:
        yield
    finally:
        if progress is not None:
            progress.end.remote(name)


@contextmanager
def interrupted_when_stopped(progress, name: str, poll_s: float = 1.0):
    """Run a ``TorchTrainer.fit`` that a stop interrupts like Ctrl-C.

    A watcher thread polls the stop flag and raises SIGINT in the task's main thread, where Ray
    Train's handler aborts the controller (its workers and placement group go with it). A
    controller still waiting for its placement group answers once the group is placed (e.g. when
    the run's other trainers, aborted too, give their CPUs back) or, if it never is, when the
    driver's job ends. Never kill the controller instead: its placement group would then stay
    reserved wherever Ray Train's cleaner has no state API (no dashboard) to notice.
    """
    done, lock = threading.Event(), threading.Lock()

    def watch() -> None:
        while not done.wait(poll_s):
            if stop_reason(progress) is not None:
                with lock:
                    if not done.is_set():
                        _thread.interrupt_main(signal.SIGINT)
                return

    if progress is not None:
        threading.Thread(target=watch, name=f"stop-watch-{name}", daemon=True).start()
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        reason = stop_reason(progress)
        if reason is None:
            raise
        raise Stopped(f"stage `{name}` interrupted: the run was stopped ({reason})") from None
    finally:
        with lock:
            done.set()


@ray.remote
def run_stage(stage: Stage, ctx: Context, digest: str, progress, *upstream: Result) -> Result:
    if not ctx.cfg.resources.use_gpu:  # as many torch threads as CPUs reserved (`resources`)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    with stage_running(progress, stage.name):
        result = stage.run(ctx, dict(zip(stage.deps, upstream)), poster(progress))
        ctx.store.mark(stage.name, digest, result.to_json(), result.outputs())
    return result


@ray.remote(num_cpus=0)
def run_lora_stage(stage: LoraStage, ctx: Context, digest: str, progress, *upstream: Result) -> Result:
    with stage_running(progress, stage.name):
        inputs = dict(zip(stage.deps, upstream))
        spec = stages.lora_spec(ctx, stage, inputs)
        with interrupted_when_stopped(progress, stage.name):
            result = fit_lora(spec, ctx.cfg, inputs["base"], f"{stage.name.replace('/', '-')}-{digest}", progress)
        ctx.store.mark(stage.name, digest, result.to_json(), result.outputs())
    return result


def task_cpus(stage: Stage, nodes: list[float], free: float) -> int:
    """CPUs of a non-LoRA stage task: one, or for a stage every other waits for
    (:attr:`~loramix.plan.Stage.alone`: pre-training the demo base) the largest node's (``nodes``),
    as many as are ``free`` when it is submitted: nothing else could use them meanwhile (on 2 CPUs
    the demo base pre-trains 1.2-1.4x faster than on one)."""
    if not stage.alone:
        return 1
    return max(1, int(min(max(nodes, default=1.0), free)))


def resources(stage: Stage, ctx: Context) -> dict:
    """A non-LoRA stage task: :func:`task_cpus`, and a GPU with ``resources.use_gpu``."""
    cpus = task_cpus(stage, node_cpus(), ray.available_resources().get("CPU", 1.0))
    return {"num_cpus": cpus, "num_gpus": 1 if ctx.cfg.resources.use_gpu else 0}


def launch(stage: Stage, ctx: Context, digest: str, progress, upstream: list) -> ray.ObjectRef:
    """Submit one stage with its upstream results (values or refs: ``stage.deps``, then the
    ``stage.after`` it only waits for, which the task ignores); its old marker goes first, so a
    crash while it rewrites its outputs leaves no marker vouching for them."""
    ctx.store.invalidate(stage.name)
    if stage.kind == "lora":
        return run_lora_stage.remote(stage, ctx, digest, progress, *upstream)
    return run_stage.options(**resources(stage, ctx)).remote(stage, ctx, digest, progress, *upstream)
