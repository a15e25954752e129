"""The typed messages between stages: each stage's result, the context every stage reads and the
progress callback. Plain dataclasses (JSON in the stage markers, pickled across Ray boundaries),
read by attribute everywhere; :mod:`loramix.plan` wires them into the graph and
:mod:`loramix.stages` produces them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from loramix.artifact import StageStore, file_digest
from loramix.config import ExpertConfig, LoramixConfig

Progress = Callable[[str, int], Callable]  # (job, total steps) -> report(metrics, ckpt)


def quiet(job: str, total: int):
    return lambda metrics, ckpt=None: None


# ------------------------------------------------------------------------------------ typed results
class Result:
    """A stage's output; JSON in the stage marker, a dataclass everywhere else."""

    def to_json(self) -> dict:
        return asdict(self)

    def outputs(self) -> list[str]:
        """The files this result stands for (the marker checks they are unchanged)."""
        path = getattr(self, "path", None)
        return [path] if path else []

    @classmethod
    def from_json(cls, data: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class BaseResult(Result):
    base: str  # a directory or hub id that `from_pretrained` loads
    tokenizer: str
    seconds: float = 0.0
    built: bool = False  # the demo base this run wrote (vouched for by its marker)

    def outputs(self) -> list[str]:
        return [self.base] if self.built else []


@dataclass(frozen=True)
class LoraResult(Result):
    path: str  # the adapter directory (PEFT format)
    steps: int  # steps actually run
    max_steps: int
    final_loss: float | None  # None: an adapter brought in, not trained here
    seconds: float
    losses: list[float]
    trainable_params: int
    data: str  # where its rows came from
    stopped: str = "max_steps"  # or "early"
    best_step: int | None = None
    cooldown_from: int | None = None  # the step early stopping began the learning-rate cooldown
    rewarmed_at: list[int] = field(default_factory=list)  # training went on after a cooldown still falling
    val_losses: list[list[float]] = field(default_factory=list)
    still_improving: bool = False
    zero_stage: int | None = None
    num_workers: int = 1
    node_ids: list[str] = field(default_factory=list)
    wall_seconds: float | None = None
    resumed_from: int = 0
    loop_seconds_per_step: float | None = None  # the trainer's own loop time (`loramix bench --ray`)
    peak_rss_mib: float | None = None
    peak_gpu_mib: float | None = None
    cpu_threads: int | None = None  # torch threads per worker (`resources.cpus_per_worker`)


@dataclass(frozen=True)
class RouterResult(Result):
    path: str  # the mixture it trained (OUTPUT/mixture), published as a version after evaluation
    steps: int
    final_loss: float
    seconds: float
    losses: list[float]
    trainable_params: int
    warm_start: dict | None = None  # {"from", "kept"} or {"from", "skipped"} (stages.warm_start)


@dataclass(frozen=True)
class EvalResult(Result):
    per_domain: dict[str, dict[str, float]] | None = None
    avg: dict[str, float] | None = None
    general: dict[str, float] | None = None
    router: dict | None = None
    error: str | None = None
    seconds: float = 0.0


def data_fields(cfg: LoramixConfig) -> list[str]:
    """The data columns every stage reads (renaming them changes what the rows mean)."""
    return [cfg.data.prompt_field, cfg.data.completion_field]


@dataclass(frozen=True)
class Context:
    """What every stage reads: the validated config (``output`` absolute) and the data's digests."""

    cfg: LoramixConfig
    train_digests: dict[str, str]  # domain -> digest of its train file
    eval_digests: dict[str, str | None]
    general_digest: str | None
    universal_digest: str | None  # of `universal.train`

    @classmethod
    def create(cls, cfg: LoramixConfig) -> Context:
        return cls(
            cfg=cfg,
            train_digests={d.name: file_digest(d.train) for d in cfg.data.domains},
            eval_digests={d.name: file_digest(d.eval) for d in cfg.data.domains},
            general_digest=file_digest(cfg.data.general),
            universal_digest=file_digest(cfg.universal.train),
        )

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    @property
    def store(self) -> StageStore:
        return StageStore(self.out)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a LoRA trainer's worker needs (``actors/lora_worker.py``), built once by the
    trainer and passed as ``train_loop_config["worker"]``."""

    optim: ExpertConfig  # steps: the maximum (or the multitask budget)
    base: str  # directory or hub id
    tokenizer: str
    dtype: str
    ds_config: dict  # a configs/deepspeed template
    trunk: str | None  # MoDULA-Res: the universal adapter under the expert
    name: str  # the job, e.g. "expert/reverse"
    seed: int
    checkpoint_every: int
    log_every: int
    validate: bool = False  # a "val" dataset is passed: stop early on its loss
    revision: str | None = None  # of a hub base
    progress: Any = None  # a ProgressActor handle
