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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from loramix import adapters, data, recipes, stages
from loramix.artifact import file_digest, fingerprint, tree_stamp
from loramix.config import LoramixConfig, data_paths
from loramix.messages import (  # noqa: F401  (re-exported: the graph's public types)
    BaseResult,
    Context,
    EvalResult,
    LoraResult,
    Progress,
    Result,
    RouterResult,
    data_fields,
    quiet,
)

logger = logging.getLogger(__name__)

BASELINES = ("multitask_lora", "merge_linear", "merge_ties", "merge_cat")  # `baselines: false` skips these
METHODS = ("base", "oracle", "multitask_lora", "merge_linear", "merge_ties", "merge_cat", "mixture")


@dataclass(frozen=True)
class Stage:
    name: str
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = field(default=(), kw_only=True)  # waited for, not read (nor in its digest)
    kind: ClassVar[str] = "task"  # "lora": one LoRA trainer (a Ray Train job under `loramix run`)
    alone: ClassVar[bool] = False  # every other stage waits for it: it may take a whole node's CPUs
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
    alone: ClassVar = True

    def key(self, ctx):
        cfg = ctx.cfg
        # A local base folder rewritten in place must not keep its hash (a hub id pins `model.revision`).
        local = [p for p in (cfg.model.base, cfg.model.tokenizer) if p and Path(p).exists()]
        return [cfg.model, cfg.seed, cfg.data.max_length, [tree_stamp(p) for p in local]]

    def run(self, ctx, inputs, progress=quiet):
        return stages.base_stage(ctx.cfg, ctx.out / "base", progress)


@dataclass(frozen=True)
class LoraStage(Stage):
    """One LoRA: ``sources`` are (label, file) pairs whose rows it trains on.

    ``section`` is the config section of its optimiser (``expert`` or ``universal``); ``trunk``
    names the stage whose adapter a MoDULA-Res expert reads; ``budget_from`` (multitask) sets
    its steps to what those stages used together, with no early stopping. ``replaces``: how many
    trainers' CPUs it may take because nothing else trains meanwhile (the multitask baseline
    after its experts, a MoDULA-Res universal before them), shared with the ``beside`` stage tasks
    that run while it trains (the router, beside the multitask baseline); neither enters the key.
    """

    sources: tuple[tuple[str, str], ...] = ()
    section: str = "expert"
    out_dir: str = ""
    trunk: str | None = None
    budget_from: tuple[str, ...] = ()
    share: float = 0.0  # of the rows drawn from the sources after the first (:func:`stages.source_rows`)
    data_label: str = ""
    replaces: int = 1
    beside: int = 0
    kind: ClassVar[str] = "lora"
    result_type: ClassVar = LoraResult

    def key(self, ctx):
        cfg = ctx.cfg
        digests = [file_digest(path) for _, path in self.sources]
        # Named by role, not by stage name: a search and a run, or two domains with the same
        # rows and settings, share one LoRA.
        role = self.name.split("/")[0]
        optim = self.optim(ctx).model_dump(exclude={"steps"} if self.budget_from else None)
        return [role, optim, cfg.seed, digests, data_fields(cfg), *([self.share] if self.share else [])]

    def digest(self, ctx, upstream):
        return fingerprint(self.key(ctx), [upstream[d] for d in self.deps])

    def optim(self, ctx):
        """The optimiser section; the multitask baseline's steps come from its budget at run time."""
        return stages.optim_section(ctx.cfg, self.section)

    def run(self, ctx, inputs, progress=quiet):
        return stages.lora_local(ctx, self, inputs, progress)


@dataclass(frozen=True)
class AdapterStage(Stage):
    """A domain's expert brought as a PEFT LoRA trained elsewhere (``data.domains[].adapter``):
    checked against the base (its name, modules and shapes), then copied to ``out_dir``."""

    adapter: str = ""
    out_dir: str = ""
    result_type: ClassVar = LoraResult

    def key(self, ctx):
        return ["adapter", file_digest(self.adapter)]

    def run(self, ctx, inputs, progress=quiet):
        return adapters.adapter_stage(ctx, self, inputs)


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
        return stages.eval_stage(ctx, self.method, inputs)


# ------------------------------------------------------------------------------------ the graph
def build_plan(cfg: LoramixConfig) -> list[Stage]:
    """The stages of ``cfg`` in an order that respects their dependencies."""
    domains = cfg.data.domains
    plan: list[Stage] = [BaseStage("base")]
    trunk = None
    universal_deps: tuple[str, ...] = ()
    trained = max(1, sum(not d.adapter for d in domains))  # experts that train here, each on its own CPUs
    if cfg.universal.enabled:
        u = cfg.universal
        general, share = u.train, u.domain_share
        drawn = tuple((d.name, d.train) for d in domains)
        if u.domain_files is not None:  # pinned by the expert commands
            drawn = tuple((Path(f).stem, f) for f in u.domain_files)
        sources = ((("general", general),) if general else ()) + (drawn if u.draws_from_domains else ())
        label = "the union of the domains (no `universal.train`)"
        if general:
            label = f"general data ({general})" + (f" + {share:.0%} of its rows from the domains" if share else "")
        trunk = "universal" if u.variant == "res" else None
        alone = trained if trunk else 1  # every Res expert waits for it
        plan.append(
            LoraStage(
                "universal", ("base",), sources, "universal", "universal", share=share, data_label=label, replaces=alone
            )
        )
        universal_deps = ("universal",)
    experts = []
    for d in domains:
        name = f"expert/{d.name}"
        experts.append(name)
        if d.adapter:
            plan.append(AdapterStage(name, ("base",), adapter=d.adapter, out_dir=f"experts/{d.name}"))
            continue
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
    if cfg.baselines:
        plan.append(
            LoraStage(
                "multitask_lora",
                ("base", *experts),
                tuple((d.name, d.train) for d in domains),
                "expert",
                "multitask_lora",
                budget_from=tuple(experts),
                data_label="the union of the domains",
                replaces=trained,
                beside=1,  # the router trains meanwhile, on one CPU
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
    # Scoring the experts (oracle, merges) waits for the router when the baseline trains: on a small
    # cluster it would take the CPU the baseline's trainer waits for, the longest stage (which then
    # started 39 -> 28 s after the last expert on 2 CPUs).
    after = ("router",) if cfg.baselines else ()
    for method in (m for m in METHODS if cfg.baselines or m not in BASELINES):
        deps = eval_deps.get(method, ("base", *loras))
        waits = after if deps == ("base", *loras) else ()
        plan.append(EvalStage(f"eval/{method}", deps, after=waits, method=method))
    return plan


def digests(plan: list[Stage], ctx: Context) -> dict[str, str]:
    """Every stage's input digest, computed before anything runs (the cache decisions)."""
    out: dict[str, str] = {}
    for stage in plan:
        out[stage.name] = stage.digest(ctx, out)
    return out


def load_result(stage: Stage, data: dict) -> Result:
    return stage.result_type.from_json(data)


def check_data(cfg: LoramixConfig) -> None:
    """Read every data file once before anything runs: a bad row stops the run in seconds, naming
    the setting, the file and the row, instead of failing a stage after the experts trained."""
    for i, d in enumerate(cfg.data.domains):
        if not d.eval:
            raise data.DataError(
                f"domain {d.name!r} has no `eval` file; every domain is scored: set `data.domains.{i}.eval`."
            )
    for key, path in data_paths(cfg).items():
        try:
            data.load_rows(path, cfg.data.prompt_field, cfg.data.completion_field)
        except data.DataError as err:
            raise data.DataError(f"`{key}`: {err}") from None


def run_local(cfg: LoramixConfig, progress: Progress = quiet) -> tuple[dict[str, Result], list[str]]:
    """Run (or reuse) every stage of ``cfg`` in this process; returns ``(results, cached stage names)``."""
    check_data(cfg)
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
