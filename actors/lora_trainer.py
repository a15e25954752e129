"""Turn a LoRA stage into a Ray Train job: one ``TorchTrainer`` per LoRA (experts, universal, multitask).

Each LoRA is one ``TorchTrainer`` with ``resources.num_workers`` DeepSpeed workers; the pipeline
launches many at once (one stage task each), so experts train concurrently and the autoscaler
sees every pending trainer's resource request.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.lora_worker import deepspeed_template, train_lora_worker
from loramix import stages
from loramix.artifact import atomic_dir, read_json
from loramix.config import LoramixConfig
from loramix.messages import WorkerConfig
from loramix.plan import BaseResult, LoraResult

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default)
# and each turn of a trainer's life (placed, started, finished) waits for a poll: a trainer whose
# loop does nothing took 11.1-11.4 s to fit, 7.1-8.4 s at 0.5 s (7.0-7.3 s at 0.25 s). A pipeline
# fits one trainer per LoRA. Set by fit_lora unless the user set it (Ray propagates it to workers).
HEALTH_CHECK_INTERVAL_S = "0.5"


class Workers(NamedTuple):
    """How many workers a trainer runs and the CPUs each reserves."""

    count: int
    cpus: float


def widened_workers(cfg: LoramixConfig, replaces: int, nodes: list[float], batch_size: int, beside: int = 0) -> Workers:
    """Data-parallel workers for a CPU trainer that trains while ``replaces`` trainers wait or are done.

    The multitask baseline trains the steps of every expert together, after they finished, and a
    MoDULA-Res universal LoRA trains before any expert can start: with ``resources.num_workers``
    each would use one worker's CPUs of a machine the experts keep busy. It takes the CPUs those
    trainers held together (capped by the cluster's CPUs, ``nodes``: each alive node's) as more
    workers of ``resources.cpus_per_worker`` each, every one on its share of the same global batch,
    rather than more torch threads in one worker (measured on the demo: one worker with two
    threads ran at one thread's speed). Only as many as divide ``batch_size``; GPU trainers are
    bound by their GPU and keep ``resources.num_workers``.

    ``beside``: stage tasks of one CPU each that run while it trains (the router, beside the
    multitask baseline). On one machine the workers reserve less than a CPU each so that these fit
    too, and take the CPUs back from the OS the moment those tasks end. Measured on the 2-CPU demo
    machine (one LoRA step, batch 32): one worker 65.5 ms; two workers 46.4 ms; two workers beside
    a third busy process 63 ms (so nothing lost while the router trains, 1.41x once it ends; 1.17x
    over a whole demo baseline, where the router and the scoring stages share the cores for part of
    it), where one worker waiting for the router's CPU, or the router for the workers', lost more
    than a second worker gained. Across nodes the workers keep whole CPUs and leave those tasks theirs (workers of
    half a CPU would be packed onto one node's core).
    """
    res = cfg.resources
    if replaces <= 1 or res.use_gpu or not nodes:
        return Workers(res.num_workers, res.cpus_per_worker)
    one_trainer = res.num_workers * res.cpus_per_worker  # the CPUs of one trainer
    one_node = len(nodes) == 1
    held = min(replaces * one_trainer, sum(nodes) - (0 if one_node else beside))
    factor = max(1, int(held // one_trainer))
    while factor > 1 and batch_size % (res.num_workers * factor):
        factor -= 1
    count, cpus = res.num_workers * factor, res.cpus_per_worker
    if one_node and beside and factor > 1 and count * cpus > nodes[0] - beside:
        cpus = (nodes[0] - beside) / count
    return Workers(count, cpus)


def scaling_config(cfg: LoramixConfig, workers: Workers | None = None) -> ScalingConfig:
    """``resources.*`` (or ``workers``) -> ``ScalingConfig`` (one GPU per worker when ``use_gpu``)."""
    res = cfg.resources
    count, cpus = workers or (res.num_workers, res.cpus_per_worker)
    per_worker = {"CPU": cpus} | ({"GPU": 1} if res.use_gpu else {})
    return ScalingConfig(num_workers=count, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def run_config(cfg: LoramixConfig, name: str) -> RunConfig:
    """A stable ``name`` + storage path make a relaunch resume from the run's latest checkpoint."""
    storage = cfg.train.storage_path or str(Path(cfg.output) / "ray_storage")
    env = {} if cfg.resources.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    return RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env=env,
    )


def node_cpus() -> list[float]:
    """The CPUs of every alive node of the cluster this process is connected to."""
    return [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]]


def _rows(examples) -> list[dict]:
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def fit_lora(spec: stages.LoraSpec, cfg: LoramixConfig, base: BaseResult, run_name: str, progress=None) -> LoraResult:
    """Fit one LoRA on Ray Train and place its adapter at ``spec.out_dir``."""
    t0 = time.perf_counter()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    worker = WorkerConfig(
        optim=spec.optim,
        base=base.base,
        tokenizer=base.tokenizer,
        dtype=cfg.model.dtype,
        ds_config=deepspeed_template(cfg.train.zero_stage),
        trunk=spec.trunk,
        name=spec.job,
        seed=cfg.seed,
        checkpoint_every=cfg.train.checkpoint_every,
        log_every=cfg.train.log_every,
        validate=bool(spec.val and spec.optim.patience),
        revision=cfg.model.revision,
        progress=progress,
    )
    workers = widened_workers(cfg, spec.replaces, node_cpus(), spec.optim.batch_size, spec.beside)
    datasets = {"train": ray.data.from_items(_rows(spec.train))}
    if worker.validate:
        datasets["val"] = ray.data.from_items(_rows(spec.val))
    trainer = TorchTrainer(
        train_lora_worker,
        train_loop_config={"worker": worker},
        scaling_config=scaling_config(cfg, workers),
        run_config=run_config(cfg, run_name),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker takes its stride (`shard_examples`)
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        summary = read_json(ckpt / "summary.json")
        adapter = ckpt / "adapter"
        with atomic_dir(spec.out_dir) as tmp:
            for f in adapter.iterdir():
                if f.is_symlink() or not f.is_file():  # a checkpoint may not point outside `train.storage_path`
                    raise RuntimeError(
                        f"checkpoint {str(adapter)!r}: {f.name!r} is not a plain file; refusing it. Point "
                        "`train.storage_path` only at storage you trust (it also holds pickled optimizer state)."
                    )
                shutil.copy2(f, tmp / f.name)
    nodes = ray.get(progress.snapshot.remote())["nodes"].get(spec.job, {}) if progress is not None else {}
    return stages.lora_result(
        spec,
        summary,
        summary["trainable_params"],
        summary["seconds"],
        zero_stage=cfg.train.zero_stage,
        num_workers=workers.count,
        node_ids=sorted(set(nodes.values())),
        wall_seconds=time.perf_counter() - t0,
        resumed_from=summary.get("resumed_from", 0),
        **{k: summary.get(k) for k in ("loop_seconds_per_step", "peak_rss_mib", "peak_gpu_mib", "cpu_threads")},
    )
