"""Turn config into Ray Train objects and fit one LoRA per call (experts, universal, multitask).

Each LoRA is one ``TorchTrainer`` with ``resources.num_workers`` DeepSpeed workers; the caller
launches many at once (one ``fit_lora`` task each), so experts train concurrently and the
autoscaler sees every pending trainer's resource request.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.lora_worker import deepspeed_template, train_lora_worker
from loramix.artifact import atomic_dir
from loramix.config import ExpertConfig, LoramixConfig


def scaling_config(cfg: LoramixConfig) -> ScalingConfig:
    """``resources.*`` -> ``ScalingConfig`` (one GPU per worker when ``use_gpu``)."""
    res = cfg.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=per_worker)


def run_config(cfg: LoramixConfig, output: Path, name: str) -> RunConfig:
    """A stable ``name`` + storage path make a relaunch resume from the run's latest checkpoint."""
    storage = cfg.train.storage_path or str(output / "ray_storage")
    env = {} if cfg.resources.use_gpu else {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    return RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        worker_runtime_env=env,
    )


def fit_lora(
    job: str,
    cfg_dict: dict,
    optim: dict,
    base_info: dict,
    rows: list[dict],
    out_dir: str,
    run_name: str,
    universal: str | None,
    progress,
) -> dict:
    """Fit one LoRA on ``rows`` and place its PEFT adapter at ``out_dir``; returns the training summary."""
    cfg = LoramixConfig.model_validate(cfg_dict)
    optim = ExpertConfig.model_validate(optim)
    output = Path(cfg_dict["output"])
    trainer = TorchTrainer(
        train_lora_worker,
        train_loop_config={
            "optim": optim.model_dump(mode="json"),
            "base": base_info["base"],
            "tokenizer": base_info["tokenizer"],
            "dtype": cfg.model.dtype,
            "ds_config": deepspeed_template(cfg.train.zero_stage),
            "universal": universal,
            "name": job,
            "seed": cfg.seed,
            "checkpoint_every": cfg.train.checkpoint_every,
            "log_every": cfg.train.log_every,
            "progress": progress,
        },
        scaling_config=scaling_config(cfg),
        run_config=run_config(cfg, output, run_name),
        datasets={"train": ray.data.from_items(rows)},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        summary = json.loads((ckpt / "summary.json").read_text())
        adapter = ckpt / (ckpt / "adapter_path.txt").read_text().strip()
        with atomic_dir(out_dir) as tmp:
            for f in adapter.iterdir():
                shutil.copy2(f, tmp / f.name)
    nodes = ray.get(progress.snapshot.remote())["nodes"].get(job, {}) if progress is not None else {}
    return summary | {
        "zero_stage": cfg.train.zero_stage,
        "num_workers": cfg.resources.num_workers,
        "steps": optim.steps,
        "node_ids": sorted(set(nodes.values())),
    }
