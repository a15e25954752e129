"""Ray Train worker loop: train one LoRA (a domain expert, the universal LoRA or the multitask
baseline) with a DeepSpeed engine, data from Ray Data, early stopping, resumable checkpoints.

Built into a ``TorchTrainer`` by :mod:`actors.lora_trainer`; the model and the loop come from the
core (:mod:`loramix.trainees`, :mod:`loramix.loops`), this file only wires DeepSpeed, Ray Data
and Ray Train reporting around them.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramix import data, loops
from loramix.config import ExpertConfig
from loramix.messages import WorkerConfig
from loramix.trainees import build_trainee, save_trainee, trainable_parameters
from loramix.validation import Validation

logger = logging.getLogger(__name__)

DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


class DeepSpeedStepper:
    """:class:`loramix.loops.Stepper` over a DeepSpeed engine (clipping and LR schedule inside)."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def anneal(self, start: int, steps: int) -> None:
        loops.anneal(self.engine.lr_scheduler, start, steps)  # the LambdaLR handed to deepspeed.initialize

    def rewarm(self, start: int, steps: int) -> None:
        loops.rewarm(self.engine.lr_scheduler, start, steps)


def shard_examples(dataset, rank: int = 0, world: int = 1) -> list[data.Example]:
    """Rank ``rank``'s rows of a Ray Data dataset (every ``world``-th, after sorting), read once into memory.

    LoRA training rows are small (token ids); reading them once and reshuffling in memory every
    epoch (:func:`loramix.data.batches`, as the in-process trainer does) replaces re-executing the
    Ray Data pipeline every epoch. Every worker reads the whole dataset and keeps its stride rather
    than Ray Data's streaming split, whose coordinator actor cost each trainer's start 3-4 s (a new
    process on a machine the other trainers keep busy) to split a few thousand rows. Sorted, so the
    rows and the seeded shuffle do not depend on the order Ray Data delivered them in: a run resumed
    from a checkpoint trains on the batches the lost one would have.
    """
    rows = sorted((list(row["input_ids"]), list(row["labels"])) for row in dataset.iter_rows())
    return [data.Example(ids, labels) for ids, labels in rows[rank::world]]


def on_device(batches: Iterable[dict], device) -> Iterator[dict[str, torch.Tensor]]:
    for batch in batches:
        yield {k: v.to(device) for k, v in batch.items()}


def deepspeed_template(stage: int) -> dict:
    """``configs/deepspeed/zero<stage>.json``, with ``auto`` fields for :func:`deepspeed_config`."""
    path = DEEPSPEED_DIR / f"zero{stage}.json"
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} is missing; `train.zero_stage` must be 0-3.")
    return json.loads(path.read_text())


def deepspeed_config(template: dict, cfg: ExpertConfig, world_size: int) -> dict:
    """Fill the ``auto`` fields of a ``configs/deepspeed/*.json`` template from the schema."""
    if cfg.batch_size % world_size:
        raise ValueError(
            f"`expert.batch_size` ({cfg.batch_size}) must be divisible by `resources.num_workers` ({world_size})."
        )
    ds = json.loads(json.dumps(template))
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // world_size
    ds["gradient_clipping"] = cfg.grad_clip
    ds["train_batch_size"] = cfg.batch_size
    return ds


def clear_stale_build_locks(max_idle_s: float = 300.0) -> list[Path]:
    """Remove torch extension build locks that no build holds any more; returns the ones removed.

    DeepSpeed builds a small op (``deepspeed_shm_comm`` on CPU) the first time a venv uses it,
    under torch's lock file. A worker killed mid-build (a stopped run, a lost node) leaves the lock,
    and every later DeepSpeed start waits on it forever, silently (seen: a benchmark hung for 20
    minutes). A lock whose build folder has not changed for ``max_idle_s`` is taken as stale: a
    live build writes its files within a minute or two.
    """
    from torch.utils.cpp_extension import get_default_build_root  # only here: the module imports setuptools

    root, removed = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()), []  # as torch picks it
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        newest = max((f.stat().st_mtime for f in lock.parent.iterdir() if f.is_file()), default=0.0)
        if time.time() - newest > max_idle_s:
            lock.unlink(missing_ok=True)
            logger.warning(
                "removed a stale torch extension build lock %s (nothing built there for %.0f s)",
                lock,
                time.time() - newest,
            )
            removed.append(lock)
    return removed


def make_engine(model, cfg: ExpertConfig, ds_template: dict, world_size: int):
    """A DeepSpeed engine over ``model``'s trainable (LoRA) parameters: torch AdamW + warmup/cosine.

    A torch optimizer rather than DeepSpeed's fused/CPU Adam builds, so the same engine runs on
    GPUs (NCCL) and on CPUs (``DS_ACCELERATOR=cpu``, gloo) without compiling optimizer ops.
    Expects ``torch.distributed`` to be initialised (Ray Train does it; DeepSpeed joins that group).
    """
    clear_stale_build_locks()  # before DeepSpeed may build its op
    import deepspeed  # on the worker, after DS_ACCELERATOR is set

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = loops.adamw(model.named_parameters(), cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=trainable,
        config=deepspeed_config(ds_template, cfg, world_size),
    )
    return engine


def gathered_snapshot(engine, model):
    """``snapshot``/``restore`` of the trainable parameters that also work when ZeRO-3 shards them
    (every rank must call them: gathering is a collective)."""
    import deepspeed  # on the worker, after DS_ACCELERATOR is set

    params = [p for p in model.parameters() if p.requires_grad]
    zero3 = engine.zero_optimization_stage() == 3

    def snapshot():
        with deepspeed.zero.GatheredParameters(params, enabled=zero3):
            return [p.detach().clone().cpu() for p in params]

    def restore(saved):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero3), torch.no_grad():
            for p, s in zip(params, saved):
                p.data.copy_(s.to(p.device, p.dtype))

    return snapshot, restore


def validator(engine, val_batches: list[dict]):
    """The mean validation loss over every rank (each rank holds all validation rows; the mean keeps
    the ranks' early-stopping decisions identical)."""

    def validate() -> float:
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        for batch in val_batches:
            loss = loops.lm_loss(engine, batch)[0]
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=engine.device)
        if dist.is_initialized():
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    return validate


def train_lora_worker(config: dict) -> None:
    """``train_loop_per_worker`` for one LoRA (``config["worker"]``: a :class:`WorkerConfig`)."""

    w: WorkerConfig = config["worker"]
    cfg = w.optim
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # as many threads as CPUs reserved (`resources.cpus_per_worker`)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    if w.progress is not None:
        w.progress.worker.remote(w.name, rank, ray.get_runtime_context().get_node_id(), os.getpid())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _report_if_finished(checkpoint, rank):
        return
    torch.manual_seed(w.seed)
    tokenizer = AutoTokenizer.from_pretrained(w.tokenizer)
    base = AutoModelForCausalLM.from_pretrained(w.base, dtype=getattr(torch, w.dtype), revision=w.revision)
    model = build_trainee(base, cfg, trunk=w.trunk)  # DeepSpeed places it on `device`
    engine = make_engine(model, cfg, w.ds_config, world)
    validation = None
    if w.validate:
        rows = shard_examples(ray.train.get_dataset_shard("val"))  # every worker validates on all of them
        chunks = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
        val = list(on_device((data.collate(c, tokenizer.pad_token_id) for c in chunks), device))
        validation = Validation.of(validator(engine, val), cfg)
        validation.snapshot, validation.restore = gathered_snapshot(engine, model)
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="state", load_module_strict=False)  # the LoRA: the base is not in it
            start = json.loads((Path(ckpt_dir) / "step.json").read_text())["step"]
            if validation is not None:
                validation.load(Path(ckpt_dir) / "validation")
        logger.info("%s: resumed from step %d", w.name, start)
    rows = shard_examples(ray.train.get_dataset_shard("train"), rank, world)
    micro = cfg.batch_size // world
    pad = tokenizer.pad_token_id
    batches = on_device(data.batches(rows, micro, pad, seed=w.seed, steps=cfg.steps, start=start), device)
    started = time.perf_counter()

    def report(metrics: dict, _ckpt=None) -> None:
        step = metrics["step"]
        if rank == 0 and w.progress is not None:
            w.progress.update.remote(w.name, step, cfg.steps, metrics["loss"])
        if step % w.checkpoint_every == 0 and step < cfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                # Every rank writes its ZeRO partition; the frozen base is the model's own files, not
                # the checkpoint's (a 7B base would be 14 GB written every `checkpoint_every` steps).
                engine.save_checkpoint(tmp, tag="state", exclude_frozen_parameters=True)
                (Path(tmp) / "step.json").write_text(json.dumps({"step": step}))
                if validation is not None and rank == 0:
                    validation.save(Path(tmp) / "validation")
                t0 = time.perf_counter()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                logger.info("%s: checkpoint at step %d saved in %.1fs", w.name, step, time.perf_counter() - t0)
        elif step % w.log_every == 0:
            ray.train.report(metrics)

    summary = loops.run_steps(
        engine,
        batches,
        loops.lm_loss,
        DeepSpeedStepper(engine),
        report=report,
        log_every=w.log_every,
        start_step=start,
        max_steps=cfg.steps,
        validation=validation,
    )
    final = summary | {
        "loss": summary["final_loss"],
        "seconds": time.perf_counter() - started,
        "resumed_from": start,
        "trainable_params": trainable_parameters(model),
        # What `loramix bench --ray` compares across ZeRO stages: the loop's own time and rank 0's peak memory.
        "loop_seconds_per_step": summary["seconds"] / max(1, summary["steps"] - start),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }
    save_adapter(engine, model, final, rank)


def _report_if_finished(checkpoint, rank: int) -> bool:
    """A relaunched run whose latest checkpoint is already the final adapter reports it again."""

    with checkpoint.as_directory() as ckpt_dir:
        summary = Path(ckpt_dir) / "summary.json"
        if not summary.is_file():
            return False
        final = json.loads(summary.read_text())
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copytree(ckpt_dir, tmp, dirs_exist_ok=True)
                ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(final)
    return True


def write_adapter(engine, model, directory: str | Path, rank: int) -> Path | None:
    """Gather the LoRA (ZeRO-3 shards it) and write it as an adapter directory on rank 0; its path, else None.

    Every rank must call this: gathering a ZeRO-3 parameter is a collective.
    """
    import deepspeed  # on the worker, after DS_ACCELERATOR is set

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if rank != 0:
            return None
        return save_trainee(model, directory)


def save_adapter(engine, model, final: dict, rank: int) -> None:
    """Write the adapter (:func:`write_adapter`) and report it as the run's final checkpoint."""

    with tempfile.TemporaryDirectory() as tmp:
        if write_adapter(engine, model, Path(tmp) / "adapter", rank) is None:
            ray.train.report({k: v for k, v in final.items() if not isinstance(v, list)})
            return
        (Path(tmp) / "summary.json").write_text(json.dumps(final))
        metrics = {k: v for k, v in final.items() if not isinstance(v, list)}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
