"""``loramix run``: the plan's stages (:mod:`loramix.plan`) as a Ray DAG, cached per stage by input hash.

Every stage is submitted at once with its upstream results as Ray object references, so Ray runs
each as soon as its inputs exist: the domain experts' ``TorchTrainer`` jobs all together (an
autoscaler sees every pending trainer), then the multitask baseline with the steps they used,
the router, and the evaluations in parallel. Settings that change behaviour are the config's
(:class:`loramix.config.LoramixConfig`; ``loramix config-help``); the ones specific to running
on Ray:

- ``train.zero_stage``: DeepSpeed ZeRO stage 0-3 of every LoRA trainer; ``train.checkpoint_every``:
  steps between resumable checkpoints; ``train.max_failures``: worker failures retried;
  ``train.storage_path``: where Ray Train keeps checkpoints (shared path or cloud URI).
- ``resources.*``: workers per trainer, GPUs, CPUs per worker.

A stage is skipped when ``OUTPUT/stages/<stage>.json`` holds the hash of its current inputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import ray

from actors.progress import ProgressActor
from actors.stage_tasks import launch
from loramix import plan
from loramix.artifact import atomic_dir, file_digest
from loramix.config import ConfigError, LoramixConfig, absolute_paths, data_paths, with_paths
from loramix.demo import ensure_demo_data
from loramix.lock import output_lock
from loramix.report import finish_run
from pipelines.progress import wait_with_bars

logger = logging.getLogger(__name__)


def connect(address: str | None = None) -> bool:
    """``--address``, else ``RAY_ADDRESS``, else a new local instance. True when the cluster is a
    local instance this process started (nothing autoscales it)."""
    if ray.is_initialized():
        return not (address or os.environ.get("RAY_ADDRESS"))
    address = address or os.environ.get("RAY_ADDRESS")
    # No runtime_env here: inside `ray job submit` it would clash with the job's own.
    ray.init(address=address, log_to_driver=False)
    return address is None


def check_fits(cfg: LoramixConfig, cluster: dict) -> None:
    """On a cluster nothing will grow, one trainer worker and one stage task must fit, else the run
    would wait forever: say so now, naming the setting."""
    r = cfg.resources
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if r.use_gpu and gpus < 1:
        raise ConfigError("`resources.use_gpu` is true but this cluster has no GPU. Set `resources.use_gpu=false`.")
    if r.num_workers * r.cpus_per_worker > cpus:
        raise ConfigError(
            f"one LoRA trainer needs {r.num_workers} workers x {r.cpus_per_worker:g} CPUs "
            f"(`resources.num_workers` x `resources.cpus_per_worker`) but this cluster has {cpus:g} CPUs. Lower them."
        )
    if r.use_gpu and r.num_workers > gpus:
        raise ConfigError(
            f"one LoRA trainer needs {r.num_workers} GPU workers (`resources.num_workers`) but this cluster has "
            f"{gpus:g} GPUs. Lower `resources.num_workers`."
        )


def stage_data(cfg: LoramixConfig, out: Path) -> LoramixConfig:
    """Make every data path mean the same thing on every node.

    A relative path points into the directory the command started in: in a Ray job that is the
    job's working directory, which exists on the driver's node only. Those files are copied into
    ``OUTPUT/inputs/<digest>/`` (``--output`` is storage every node sees) and the config points
    there; absolute paths are used as they are, so large data should sit on shared storage.
    """
    copies = {}
    for key, value in data_paths(cfg).items():
        src = Path(value)
        if src.is_absolute():
            continue
        dst = out / "inputs" / file_digest(src) / src.name
        if not dst.exists():
            with atomic_dir(dst.parent) as tmp:
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / src.name)
        copies[key] = str(dst)
    return absolute_paths(with_paths(cfg, copies) if copies else cfg)


def submit(cfg: LoramixConfig, stages: list[plan.Stage], progress) -> tuple[dict, list[str]]:
    """Submit every stage that is not cached; returns ``(name -> result or ref, cached names)``."""
    ctx = plan.Context.create(cfg)
    hashes = plan.digests(stages, ctx)
    nodes, cached = {}, []
    for stage in stages:
        done = ctx.store.done(stage.name, hashes[stage.name])
        if done is not None:
            nodes[stage.name] = plan.load_result(stage, done)
            cached.append(stage.name)
        else:
            upstream = [nodes[d] for d in (*stage.deps, *stage.after)]
            nodes[stage.name] = launch(stage, ctx, hashes[stage.name], progress, upstream)
    return nodes, cached


def run_pipeline(
    cfg: LoramixConfig, output: str | Path | None = None, address: str | None = None, *, note: str = "", extra=None
) -> dict:
    """Run (or reuse) every stage on Ray, then publish the artifact version and write
    ``report.json``/``report.md``/plots and ``config.yaml`` (:func:`loramix.report.finish_run`)."""
    out = Path(output or cfg.output).resolve()
    cfg = cfg.model_copy(update={"output": str(out)})
    ensure_demo_data(cfg)
    for key, path in data_paths(cfg).items():  # fail before starting Ray, naming the setting
        if not Path(path).exists():
            raise FileNotFoundError(f"`{key}`: {path!r} does not exist (relative to {str(Path.cwd())!r}).")
    plan.check_data(cfg)
    with output_lock(out):
        cfg = stage_data(cfg, out)
        local = connect(address)
        if local:
            check_fits(cfg, ray.cluster_resources())
        t0 = time.perf_counter()
        progress = ProgressActor.remote()
        stages = plan.build_plan(cfg)
        nodes, cached = submit(cfg, stages, progress)
        refs = {k: v for k, v in nodes.items() if isinstance(v, ray.ObjectRef)}
        trainers = frozenset(s.name for s in stages if s.kind == "lora")
        stall = cfg.train.stall_timeout_s if local else None
        results = wait_with_bars(refs, progress, stall_timeout_s=stall, trainers=trainers)
        results |= {k: v for k, v in nodes.items() if not isinstance(v, ray.ObjectRef)}
        timings = {
            k: 0.0 if k in cached else (getattr(v, "wall_seconds", None) or getattr(v, "seconds", 0.0))
            for k, v in results.items()
        }
        timings["total"] = time.perf_counter() - t0
        return finish_run(out, cfg, results, timings=timings, cached=cached, note=note, extra=extra)
