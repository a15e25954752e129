"""The pipeline's stage graph, defined once, Ray-free.

    base ──> [universal] ──> expert/<domain> (all at once) ──> multitask_lora ──┐
                                     └──────────────> router ──────────────────┴─> eval/<method> ─> report

:func:`build_plan` turns a config into an ordered list of stages. A stage is a small frozen
dataclass: its name, the stages it reads (``deps``), a :meth:`~Stage.digest` of everything that
determines its output (config slice, data contents, upstream digests) and a typed
:meth:`~Stage.run`. ``loramix demo`` runs the plan in this process (:func:`run_local`);
``loramix run`` runs the very same stages on Ray (``pipelines/run.py``): LoRA stages
(``kind == "lora"``) as Ray Train trainers, the others as Ray tasks. Either way a stage whose
digest matches its marker in ``OUTPUT/stages/`` is reused, so changing one domain's data
retrains that expert and what depends on it, nothing else.

- ``universal`` (MoDULA, ``universal.enabled``): a LoRA on ``universal.train`` (general data;
  unset: the union of the domains), early-stopped on its own validation rows.
- ``expert/<d>``: one LoRA per domain, alone (MoDULA-Res: on top of the frozen universal trunk),
  ``expert.steps`` at most, stopped when its validation loss stops improving.
- ``multitask_lora``: the baseline, one LoRA on every domain's rows, given exactly the steps the
  experts used together (the same budget), so it runs after them.
- ``router``: the recipe's router over the frozen experts; writes the servable ``artifact/``.
- ``eval/<method>``: each method scored on every domain (and on ``data.general``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from loramix import recipes
from loramix.artifact import StageStore, file_digest, fingerprint, tree_stamp
from loramix.config import LoramixConfig

logger = logging.getLogger(__name__)

METHODS = ("base", "oracle", "multitask_lora", "merge_linear", "merge_ties", "merge_cat", "mixture")
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
    final_loss: float
    seconds: float
    losses: list[float]
    trainable_params: int
    data: str  # where its rows came from
    stopped: str = "max_steps"  # or "early"
    best_step: int | None = None
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


@dataclass(frozen=True)
class RouterResult(Result):
    path: str  # the mixture it trained (OUTPUT/mixture), published as a version after evaluation
    steps: int
    final_loss: float
    seconds: float
    losses: list[float]
    trainable_params: int


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


# ------------------------------------------------------------------------------------ the stages
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
class Stage:
    name: str
    deps: tuple[str, ...] = ()
    kind: ClassVar[str] = "task"  # "lora": one LoRA trainer (a Ray Train job under `loramix run`)
    result_type: ClassVar[type[Result]] = Result

    def key(self, ctx: Context) -> list:
        """Everything besides the upstream stages that determines this stage's output."""
        raise NotImplementedError

    def digest(self, ctx: Context, upstream: dict[str, str]) -> str:
        return fingerprint(self.name, self.key(ctx), [upstream[d] for d in self.deps])

    def run(self, ctx: Context, inputs: dict[str, Result], progress: Progress = quiet) -> Result:
        raise NotImplementedError


@dataclass(frozen=True)
class BaseStage(Stage):
    result_type: ClassVar = BaseResult

    def key(self, ctx):
        cfg = ctx.cfg
        # A local base folder rewritten in place must not keep its hash (a hub id pins `model.revision`).
        local = [p for p in (cfg.model.base, cfg.model.tokenizer) if p and Path(p).exists()]
        return [cfg.model, cfg.seed, cfg.data.max_length, [tree_stamp(p) for p in local]]

    def run(self, ctx, inputs, progress=quiet):
        from loramix import stages

        return stages.base_stage(ctx.cfg, ctx.out / "base", progress)


@dataclass(frozen=True)
class LoraStage(Stage):
    """One LoRA: ``sources`` are (label, file) pairs whose rows it trains on.

    ``section`` is the config section of its optimiser (``expert`` or ``universal``); ``trunk``
    names the stage whose adapter a MoDULA-Res expert reads; ``budget_from`` (multitask) sets
    its steps to what those stages used together, with no early stopping.
    """

    sources: tuple[tuple[str, str], ...] = ()
    section: str = "expert"
    out_dir: str = ""
    trunk: str | None = None
    budget_from: tuple[str, ...] = ()
    data_label: str = ""
    kind: ClassVar[str] = "lora"
    result_type: ClassVar = LoraResult

    def key(self, ctx):
        cfg = ctx.cfg
        digests = [file_digest(path) for _, path in self.sources]
        # Named by role, not by stage name: a search and a run, or two domains with the same
        # rows and settings, share one LoRA.
        role = self.name.split("/")[0]
        optim = self.optim(ctx).model_dump(exclude={"steps"} if self.budget_from else None)
        return [role, optim, cfg.seed, digests, data_fields(cfg)]

    def digest(self, ctx, upstream):
        return fingerprint(self.key(ctx), [upstream[d] for d in self.deps])

    def optim(self, ctx):
        """The optimiser section; the multitask baseline's steps come from its budget at run time."""
        from loramix import stages

        return stages.optim_section(ctx.cfg, self.section)

    def run(self, ctx, inputs, progress=quiet):
        from loramix import stages

        return stages.lora_local(ctx, self, inputs, progress)


@dataclass(frozen=True)
class RouterStage(Stage):
    result_type: ClassVar = RouterResult

    def key(self, ctx):
        cfg = ctx.cfg
        return [
            "mixture-dir",  # written to OUTPUT/mixture (versions are published from it)
            cfg.recipe,
            cfg.router,
            recipes.balance_coef(cfg),
            cfg.universal.variant if cfg.universal.enabled else None,
            recipes.routed_experts(cfg),
            [ctx.train_digests[d.name] for d in cfg.data.domains],
            ctx.universal_digest,
            data_fields(cfg),
        ]

    def run(self, ctx, inputs, progress=quiet):
        from loramix import stages

        return stages.router_stage(ctx, inputs, progress)


@dataclass(frozen=True)
class EvalStage(Stage):
    method: str = "mixture"
    result_type: ClassVar = EvalResult

    def key(self, ctx):
        cfg = ctx.cfg
        return [
            self.method,
            cfg.data.eval_limit,
            cfg.data.max_length,
            [ctx.eval_digests[d.name] for d in cfg.data.domains],
            ctx.general_digest,
            cfg.model.dtype,
            data_fields(cfg),
        ]

    def run(self, ctx, inputs, progress=quiet):
        from loramix import stages

        return stages.eval_stage(ctx, self.method, inputs)


# ------------------------------------------------------------------------------------ the graph
def build_plan(cfg: LoramixConfig) -> list[Stage]:
    """The stages of ``cfg`` in an order that respects their dependencies."""
    domains = cfg.data.domains
    plan: list[Stage] = [BaseStage("base")]
    trunk = None
    universal_deps: tuple[str, ...] = ()
    if cfg.universal.enabled:
        general = cfg.universal.train
        sources = (("general", general),) if general else tuple((d.name, d.train) for d in domains)
        label = f"general data ({general})" if general else "the union of the domains (no `universal.train`)"
        plan.append(LoraStage("universal", ("base",), sources, "universal", "universal", data_label=label))
        universal_deps = ("universal",)
        trunk = "universal" if cfg.universal.variant == "res" else None
    experts = []
    for d in domains:
        name = f"expert/{d.name}"
        deps = ("base", *(universal_deps if trunk else ()))
        plan.append(
            LoraStage(
                name,
                deps,
                ((d.name, d.train),),
                "expert",
                f"experts/{d.name}",
                trunk=trunk,
                data_label=f"domain {d.name} ({d.train})",
            )
        )
        experts.append(name)
    plan.append(
        LoraStage(
            "multitask_lora",
            ("base", *experts),
            tuple((d.name, d.train) for d in domains),
            "expert",
            "multitask_lora",
            budget_from=tuple(experts),
            data_label="the union of the domains",
        )
    )
    loras = (*universal_deps, *experts)
    plan.append(RouterStage("router", ("base", *loras)))
    eval_deps = {
        "base": ("base",),
        "oracle": ("base", *loras),
        "multitask_lora": ("base", "multitask_lora"),
        "mixture": ("base", "router"),
    }
    for method in METHODS:
        plan.append(EvalStage(f"eval/{method}", eval_deps.get(method, ("base", *loras)), method=method))
    return plan


def digests(plan: list[Stage], ctx: Context) -> dict[str, str]:
    """Every stage's input digest, computed before anything runs (the cache decisions)."""
    out: dict[str, str] = {}
    for stage in plan:
        out[stage.name] = stage.digest(ctx, out)
    return out


def load_result(stage: Stage, data: dict) -> Result:
    return stage.result_type.from_json(data)


def run_local(cfg: LoramixConfig, progress: Progress = quiet) -> tuple[dict[str, Result], list[str]]:
    """Run (or reuse) every stage of ``cfg`` in this process; returns ``(results, cached stage names)``."""
    ctx = Context.create(cfg)
    plan = build_plan(cfg)
    hashes = digests(plan, ctx)
    results: dict[str, Result] = {}
    cached = []
    for stage in plan:
        done = ctx.store.done(stage.name, hashes[stage.name])
        if done is not None:
            results[stage.name] = load_result(stage, done)
            cached.append(stage.name)
            continue
        logger.info("stage %s", stage.name)
        ctx.store.invalidate(stage.name)
        result = stage.run(ctx, {d: results[d] for d in stage.deps}, progress)
        ctx.store.mark(stage.name, hashes[stage.name], result.to_json(), result.outputs())
        results[stage.name] = result
    return results, cached
