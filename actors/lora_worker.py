"""Ray Train worker loop: train one LoRA (a domain expert, the universal LoRA or the multitask
baseline) with a DeepSpeed engine, data from Ray Data, resumable checkpoints.

Built into a ``TorchTrainer`` by :mod:`pipelines.experts`; the maths and the loop come from
:mod:`loramix.loops`, this file only wires DeepSpeed, Ray Data and Ray Train reporting around it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from loramix import loops
from loramix.config import ExpertConfig
from loramix.data import pad_left

logger = logging.getLogger(__name__)

ADAPTER = "expert"  # PEFT adapter name inside the worker; the directory name is the domain
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


def pad_batch(batch: dict, pad_id: int, device) -> dict[str, torch.Tensor]:
    """Left-pad a Ray Data numpy batch of variable-length ``input_ids``/``labels`` lists."""
    padded = pad_left(list(batch["input_ids"]), list(batch["labels"]), pad_id)
    return {k: v.to(device) for k, v in padded.items()}


def shard_batches(shard, micro_batch: int, pad_id: int, device, *, steps: int, seed: int):
    """Endless epochs over this worker's Ray Data shard, stopping after ``steps`` batches."""
    done, epoch = 0, 0
    while done < steps:
        for batch in shard.iter_batches(
            batch_size=micro_batch,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=16 * micro_batch,
            local_shuffle_seed=seed + epoch,
        ):
            yield pad_batch(batch, pad_id, device)
            done += 1
            if done >= steps:
                return
        epoch += 1


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


def make_engine(model, cfg: ExpertConfig, ds_template: dict, world_size: int):
    """A DeepSpeed engine over ``model``'s trainable (LoRA) parameters: torch AdamW + warmup/cosine.

    A torch optimizer rather than DeepSpeed's fused/CPU Adam builds, so the same engine runs on
    GPUs (NCCL) and on CPUs (``DS_ACCELERATOR=cpu``, gloo) without compiling optimizer ops.
    Expects ``torch.distributed`` to be initialised (Ray Train does it; DeepSpeed joins that group).
    """
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = loops.adamw(trainable, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=trainable,
        config=deepspeed_config(ds_template, cfg, world_size),
    )
    return engine


def train_lora_worker(config: dict) -> None:
    """``train_loop_per_worker`` for one LoRA.

    ``config`` keys: ``optim`` (an ExpertConfig dict), ``base``, ``tokenizer``, ``dtype``,
    ``ds_config`` (template), ``universal`` (dir or None), ``name``, ``seed``,
    ``checkpoint_every``, ``log_every``, ``progress`` (a ProgressActor handle or None).
    """
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ExpertConfig.model_validate(config["optim"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    progress, name = config.get("progress"), config["name"]
    if progress is not None:
        progress.worker.remote(name, rank, ray.get_runtime_context().get_node_id(), os.getpid())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _report_if_finished(checkpoint, rank):
        return
    torch.manual_seed(config["seed"])
    tokenizer = AutoTokenizer.from_pretrained(config["tokenizer"])
    base = AutoModelForCausalLM.from_pretrained(config["base"], dtype=getattr(torch, config["dtype"]))
    # DeepSpeed places the model on `device`.
    model = loops.build_peft_model(base, cfg, config.get("universal"), adapter_name=ADAPTER)
    engine = make_engine(model, cfg, config["ds_config"], world)
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(ckpt_dir, tag="state")
            start = json.loads((Path(ckpt_dir) / "step.json").read_text())["step"]
        logger.info("%s: resumed from step %d", name, start)
    shard = ray.train.get_dataset_shard("train")
    micro = cfg.batch_size // world
    batches = shard_batches(
        shard, micro, tokenizer.pad_token_id, device, steps=cfg.steps - start, seed=config["seed"] + start
    )
    log_every, ckpt_every = config["log_every"], config["checkpoint_every"]
    started = time.perf_counter()

    def report(metrics: dict, _ckpt=None) -> None:
        step = metrics["step"]
        if rank == 0 and progress is not None:
            progress.update.remote(name, step, cfg.steps, metrics["loss"])
        if step % ckpt_every == 0 and step < cfg.steps:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag="state")  # every rank writes its ZeRO partition
                (Path(tmp) / "step.json").write_text(json.dumps({"step": step}))
                t0 = time.perf_counter()
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                logger.info("%s: checkpoint at step %d saved in %.1fs", name, step, time.perf_counter() - t0)
        elif step % log_every == 0:
            ray.train.report(metrics)

    summary = loops.run_steps(
        engine, batches, loops.lm_loss, DeepSpeedStepper(engine), report=report, log_every=log_every, start_step=start
    )
    final = {
        "step": cfg.steps,
        "loss": summary["final_loss"],
        "final_loss": summary["final_loss"],
        "seconds": time.perf_counter() - started,
        "resumed_from": start,
        "losses": summary["losses"],
        # What `loramix bench --ray` compares across ZeRO stages: the loop's own time and rank 0's peak memory.
        "loop_seconds_per_step": summary["seconds"] / max(1, cfg.steps - start),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    save_adapter(engine, model, name, final, rank)


def _report_if_finished(checkpoint, rank: int) -> bool:
    """A relaunched run whose latest checkpoint is already the final adapter reports it again."""
    import ray.train

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
    """Gather the LoRA (ZeRO-3 shards it) and write it as a PEFT adapter on rank 0; its folder, else None.

    Every rank must call this: gathering a ZeRO-3 parameter is a collective.
    """
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if rank != 0:
            return None
        model.save_pretrained(directory, selected_adapters=[ADAPTER])
    return Path(directory) / ADAPTER if (Path(directory) / ADAPTER).is_dir() else Path(directory)


def save_adapter(engine, model, name: str, final: dict, rank: int) -> None:
    """Write the adapter (:func:`write_adapter`) and report it as the run's final checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        src = write_adapter(engine, model, tmp, rank)
        if src is None:
            ray.train.report(final)
            return
        (Path(tmp) / "adapter_path.txt").write_text(os.path.relpath(src, tmp))
        (Path(tmp) / "summary.json").write_text(json.dumps(final))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
