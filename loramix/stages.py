"""Stage bodies: plain functions over a config and upstream results, no Ray.

:mod:`loramix.plan` says which stages a config has and in what order; this module says what each
does. The Ray shells call the same functions (a LoRA stage's :func:`lora_spec` feeds a Ray Train
job there, :func:`train_lora` here).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramix import data, evaluate, loops, recipes, router_training, synthetic
from loramix.artifact import atomic_dir
from loramix.checkpoint import read_router
from loramix.config import ExpertConfig, LoramixConfig, OptimConfig
from loramix.merge_baselines import merge_adapters
from loramix.messages import BaseResult, Context, EvalResult, LoraResult, Progress, RouterResult, quiet
from loramix.model import MixtureModel
from loramix.trainees import save_trainee
from loramix.validation import Validation

if TYPE_CHECKING:  # the graph imports this module to run its stages
    from loramix.plan import LoraStage

logger = logging.getLogger(__name__)

MAX_VAL_ROWS = 512  # a validation loss needs a few hundred rows, not a share of a million


def optim_section(cfg: LoramixConfig, section: str) -> ExpertConfig:
    """The optimiser of a LoRA stage as an :class:`ExpertConfig` (``expert``, or ``universal`` with its own rank...)."""
    if section == "expert":
        return cfg.expert
    rows = {"enabled", "train", "variant", "domain_files", "domain_share"}  # what it trains on, not how
    return ExpertConfig(**cfg.universal.model_dump(exclude=rows))


# ------------------------------------------------------------------------------------ base
def base_stage(cfg: LoramixConfig, out_dir: str | Path, progress: Progress = quiet) -> BaseResult:
    """Pre-train and save the demo base (``model.base: synthetic``) or name the real one."""
    t0 = time.perf_counter()
    if cfg.model.base != "synthetic":
        return BaseResult(cfg.model.base, cfg.model.tokenizer or cfg.model.base)
    out_dir = Path(out_dir)
    tokenizer = synthetic.build_tokenizer()
    s = cfg.model.synthetic
    torch.manual_seed(cfg.seed)
    base = synthetic.build_base(
        tokenizer,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_layers=s.num_layers,
        num_heads=s.num_heads,
        max_length=cfg.data.max_length,
    ).to(loops.accelerator())
    if s.pretrain_steps:
        rows = synthetic.make_rows("copy", 20000, seed=cfg.seed)
        examples = data.tokenize_rows(rows, tokenizer, cfg.data.max_length)
        optim = OptimConfig(steps=s.pretrain_steps, batch_size=s.batch_size, lr=s.lr)
        it = data.batches(examples, s.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=s.pretrain_steps)
        stepper = loops.TorchStepper(base.named_parameters(), optim)
        loops.run_steps(
            base, it, loops.lm_loss, stepper, report=progress("base", s.pretrain_steps), log_every=cfg.train.log_every
        )
    base.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return BaseResult(str(out_dir), str(out_dir), time.perf_counter() - t0, built=True)


def load_base(cfg: LoramixConfig, base: BaseResult):
    """The frozen base in ``model.dtype``, on this process's accelerator (a Ray task's GPU) or the CPU."""

    model = AutoModelForCausalLM.from_pretrained(
        base.base, dtype=getattr(torch, cfg.model.dtype), revision=cfg.model.revision
    )
    return model.to(loops.accelerator()).eval()


def load_tokenizer(base: BaseResult):

    tok = AutoTokenizer.from_pretrained(base.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # real tokenizers often lack one; padding is masked anyway
    return tok


def examples(cfg: LoramixConfig, tokenizer, path: str, label: int = 0, limit: int | None = None):
    fields = (cfg.data.prompt_field, cfg.data.completion_field)
    ex = data.load_domain(path, tokenizer, cfg.data.max_length, label, *fields)[1]
    return ex[:limit] if limit else ex


def eval_examples(cfg: LoramixConfig, tokenizer) -> dict[str, list[data.Example]]:
    """Each domain's eval rows (first ``data.eval_limit``), labelled by the domain's index."""
    out = {}
    for i, d in enumerate(cfg.data.domains):
        if d.eval is None:
            raise ValueError(f"domain {d.name!r} has no `eval` file; set `data.domains[{i}].eval`.")
        out[d.name] = examples(cfg, tokenizer, d.eval, i, cfg.data.eval_limit)
    return out


# ------------------------------------------------------------------------------------ LoRA stages
@dataclass
class LoraSpec:
    """What one LoRA trainer needs, wherever it runs."""

    job: str
    optim: ExpertConfig  # steps: the maximum (experts) or the budget (multitask)
    train: list[data.Example]
    val: list[data.Example]  # empty: no early stopping
    trunk: str | None  # MoDULA-Res: the universal adapter under the expert
    out_dir: str
    data: str
    replaces: int = 1  # trainers whose CPUs it may take, less ``beside`` (:class:`loramix.plan.LoraStage`)
    beside: int = 0


def split_validation(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, val)``: a seeded ``fraction`` of ``rows`` held out (at least 8 and at most 512 rows)."""
    if fraction <= 0 or len(rows) < 16:
        return rows, []
    n_val = min(MAX_VAL_ROWS, max(8, round(len(rows) * fraction)))
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def source_rows(cfg: LoramixConfig, stage: LoraStage, tokenizer) -> list[list[data.Example]]:
    """Each source's rows; with ``stage.share``, the sources after the first are sampled (seeded, equally)
    to that share of the total: the universal LoRA's general data plus some of every domain's."""
    rows = [examples(cfg, tokenizer, path) for _, path in stage.sources]
    if not stage.share or len(rows) < 2:
        return rows
    per_source = round(len(rows[0]) * stage.share / (1 - stage.share) / (len(rows) - 1))
    rng = random.Random(cfg.seed)
    return [rows[0], *(rng.sample(r, min(per_source, len(r))) for r in rows[1:])]


def lora_spec(ctx: Context, stage: LoraStage, inputs: dict) -> LoraSpec:
    """Tokenise the stage's rows and hold out its validation split (experts and multitask see the
    same training rows); the multitask baseline gets the steps its experts used."""
    cfg = ctx.cfg
    tokenizer = load_tokenizer(inputs["base"])
    optim = stage.optim(ctx)
    if stage.budget_from:
        optim = optim.model_copy(update={"steps": sum(inputs[d].steps for d in stage.budget_from)})
    train, val = [], []
    for rows in source_rows(cfg, stage, tokenizer):
        t, v = split_validation(rows, optim.val_fraction, cfg.seed)
        train += t
        val += v
    if stage.budget_from:
        val = []  # a fixed budget, not early stopping
    # A global shuffle, once: domains one after another made the multitask LoRA oscillate.
    random.Random(cfg.seed).shuffle(train)
    trunk, out = inputs[stage.trunk].path if stage.trunk else None, str(ctx.out / stage.out_dir)
    return LoraSpec(stage.name, optim, train, val, trunk, out, stage.data_label, stage.replaces, stage.beside)


def val_loss_fn(model, val: list[data.Example], batch_size: int, pad_id: int):
    """The mean completion loss of ``model`` on ``val`` (token-weighted), for early stopping."""

    def validate() -> float:
        device = loops.device_of(model)
        return evaluate.completion_loss(
            lambda b: model(**{k: v.to(device) for k, v in b.items() if k != "domain"}).logits,
            val,
            pad_id,
            batch_size,
        )

    return validate


def train_lora(spec: LoraSpec, cfg: LoramixConfig, base, tokenizer, progress: Progress = quiet) -> LoraResult:
    """Train one LoRA in this process (plain AdamW) and save it at ``spec.out_dir``."""

    t0 = time.perf_counter()
    o, pad = spec.optim, tokenizer.pad_token_id

    def validation(model):
        if not spec.val or not o.patience:
            return None
        return Validation.of(val_loss_fn(model, spec.val, o.batch_size, pad), o)

    it = data.batches(spec.train, o.batch_size, pad, seed=cfg.seed, steps=o.steps)
    model, summary = loops.train_expert(
        o,
        copy.deepcopy(base),
        it,
        report=progress(spec.job, o.steps),
        trunk=spec.trunk,
        validation=validation,
        log_every=cfg.train.log_every,
    )
    with atomic_dir(spec.out_dir) as tmp:
        save_trainee(model, tmp)
    return lora_result(spec, summary, summary["trainable_params"], time.perf_counter() - t0)


def lora_result(spec: LoraSpec, summary: dict, trainable: int, seconds: float, **extra) -> LoraResult:
    return LoraResult(
        path=spec.out_dir,
        steps=summary["steps"],
        max_steps=spec.optim.steps,
        final_loss=summary["final_loss"],
        seconds=seconds,
        losses=summary["losses"],
        trainable_params=trainable,
        data=spec.data,
        stopped=summary.get("stopped", "max_steps"),
        best_step=summary.get("best_step"),
        cooldown_from=summary.get("cooldown_from"),
        rewarmed_at=summary.get("rewarmed_at", []),
        val_losses=summary.get("val_losses", []),
        still_improving=summary.get("still_improving", False),
        **extra,
    )


def lora_local(ctx: Context, stage: LoraStage, inputs: dict, progress: Progress = quiet) -> LoraResult:
    base = inputs["base"]
    spec = lora_spec(ctx, stage, inputs)
    return train_lora(spec, ctx.cfg, load_base(ctx.cfg, base), load_tokenizer(base), progress)


# ------------------------------------------------------------------------------------ router
def adapters_of(cfg: LoramixConfig, inputs: dict) -> dict[str, str]:
    """Domain name -> expert adapter directory."""
    return {d.name: inputs[f"expert/{d.name}"].path for d in cfg.data.domains}


def build_mixture(cfg: LoramixConfig, base_model, adapters: dict[str, str], universal: str | None, *, router=True):
    """The config's mixture over frozen adapters: MoDULA-Flan routes the universal LoRA as one more
    expert; MoDULA-Res runs it as the trunk under the experts, with a routed slot for "the trunk alone"."""
    recipe = recipes.get(cfg.recipe)
    kwargs = dict(router=cfg.recipe if router else None, top_k=cfg.router.top_k, **recipe.router_kwargs(cfg.router))
    if universal is None:
        return MixtureModel.from_adapters(base_model, adapters, **kwargs)
    if cfg.universal.variant == "res":
        return MixtureModel.from_adapters(
            base_model, adapters, universal=universal, variant="res", null_experts=(recipes.UNIVERSAL,), **kwargs
        )
    return MixtureModel.from_adapters(base_model, {recipes.UNIVERSAL: universal, **adapters}, **kwargs)


def router_examples(cfg: LoramixConfig, tokenizer, names: list[str]) -> list[data.Example]:
    """Each routed expert's training rows labelled with its gate column: the domains' train files
    and, for MoDULA's universal LoRA, ``universal.train`` (so general prompts learn to go there)."""
    sources = {d.name: d.train for d in cfg.data.domains}
    if cfg.universal.enabled and cfg.universal.train:
        sources[recipes.UNIVERSAL] = cfg.universal.train
    out = []
    for name, path in sources.items():
        out += [replace(e, domain=names.index(name)) for e in examples(cfg, tokenizer, path)]
    return out


def router_setup(cfg: LoramixConfig, base: BaseResult, adapters: dict[str, str], universal: str | None, tokenizer):
    """The mixture with a fresh router (or one warm-started from ``router.warm_start``), its training
    batches, and what the warm start did (:func:`warm_start`; None without one)."""
    mm = build_mixture(cfg, load_base(cfg, base), adapters, universal)
    warm = warm_start(mm.router, cfg.router.warm_start) if cfg.router.warm_start else None
    rows = router_examples(cfg, tokenizer, mm.expert_names)
    it = data.batches(rows, cfg.router.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=cfg.router.steps)
    return mm, it, warm


def warm_start(router, artifact: str) -> dict:
    """Start ``router`` from the router of the mixture at ``artifact`` (:meth:`Router.warm_start`);
    one that is gone or of another kind (the config's recipe changed since) leaves it fresh.
    Returns ``{"from", "kept"}`` (the experts whose rows were kept) or ``{"from", "skipped"}`` (why not)."""
    try:
        names, state = read_router(artifact)
        kept = router.warm_start(state, names)
    except (OSError, ValueError) as err:
        logger.warning("router.warm_start %s not used, the router starts fresh: %s", artifact, err)
        return {"from": artifact, "skipped": str(err)}
    logger.info("router warm-started from %s: %d of %d experts kept", artifact, len(kept), len(router.expert_names))
    return {"from": artifact, "kept": kept}


def router_stage(ctx: Context, inputs: dict, progress: Progress = quiet) -> RouterResult:
    """Freeze base + experts, train the recipe's router, save the mixture artifact."""
    cfg, base = ctx.cfg, inputs["base"]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base)
    universal = inputs["universal"].path if "universal" in inputs else None
    mm, it, warm = router_setup(cfg, base, adapters_of(cfg, inputs), universal, tokenizer)
    summary = router_training.train_router(
        cfg.router,
        mm,
        it,
        report=progress("router", cfg.router.steps),
        log_every=cfg.train.log_every,
    )
    out = ctx.out / "mixture"  # the stage's output; `loramix run` publishes it as a version once evaluated
    local = Path(base.base)
    mm.save_pretrained(out, base_path=str(local.resolve()) if local.is_dir() else base.base)
    tokenizer.save_pretrained(out / "tokenizer")
    n = sum(p.numel() for p in mm.router.parameters())
    return RouterResult(
        str(out), summary["steps"], summary["final_loss"], time.perf_counter() - t0, summary["losses"], n, warm
    )


# ------------------------------------------------------------------------------------ evaluation
class _Bound:
    """Adds fixed keyword arguments to ``generate``/``__call__`` (the oracle's expert weights)."""

    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs

    def generate(self, **kw):
        return self.model.generate(**kw, **self.kwargs)

    def __call__(self, **kw):
        return self.model(**kw, **self.kwargs)


def method_models(method: str, cfg: LoramixConfig, base: BaseResult, inputs: dict):
    """``domain -> model`` for one evaluated method (``None`` names the general eval set).

    The oracle answers each domain with its own expert, and general prompts with MoDULA's
    universal LoRA when there is one (else the plain base): the right expert for each row.
    """

    model = load_base(cfg, base)
    universal = inputs["universal"].path if "universal" in inputs else None
    if method == "base":
        return lambda d: model
    if method == "multitask_lora":
        peft_model = PeftModel.from_pretrained(model, inputs["multitask_lora"].path).eval()
        return lambda d: peft_model
    if method == "mixture":
        mm = MixtureModel.from_pretrained(inputs["router"].path, base_model=model)
        return lambda d: mm
    adapters = adapters_of(cfg, inputs)
    if method == "oracle":
        mm = build_mixture(cfg, model, adapters, universal, router=False)
        names = mm.expert_names

        def oracle(d):
            pick = d if d is not None else (recipes.UNIVERSAL if recipes.UNIVERSAL in names else None)
            return _Bound(mm, expert_weights=[float(n == pick) for n in names])

        return oracle
    if method.startswith("merge_"):
        if universal is not None and cfg.universal.variant == "res":
            raise ValueError("merging experts is undefined for MoDULA-Res (experts read the universal output).")
        if universal is not None:
            adapters = {recipes.UNIVERSAL: universal, **adapters}
        merged = merge_adapters(model, adapters, combination_type=method.removeprefix("merge_"))
        return lambda d: merged
    raise ValueError(f"unknown method {method!r}.")


def eval_stage(ctx: Context, method: str, inputs: dict) -> EvalResult:
    """Exact match and completion loss of one method on every domain's eval split (and on
    ``data.general``). For ``mixture`` also the router: accuracy, confusion and gate pattern.
    A method that cannot be built for this run (e.g. PEFT refusing a linear merge of different
    ranks) gives ``error`` rather than failing the run."""
    cfg, base = ctx.cfg, inputs["base"]
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base)
    evals = eval_examples(cfg, tokenizer)
    try:
        build = method_models(method, cfg, base, inputs)
    except ValueError as err:
        return EvalResult(error=str(err))
    per = {}
    for name, ex in evals.items():
        em, loss = evaluate.score(build(name), ex, tokenizer)
        per[name] = {"exact_match": em, "loss": loss}
    avg = {k: sum(v[k] for v in per.values()) / len(per) for k in ("exact_match", "loss")}
    general = None
    if cfg.data.general:
        em, loss = evaluate.score(
            build(None), examples(cfg, tokenizer, cfg.data.general, 0, cfg.data.eval_limit), tokenizer
        )
        general = {"exact_match": em, "loss": loss}
    router = None
    if method == "mixture":
        mm = build(None)
        acc, confusion = evaluate.router_confusion(mm, evals, tokenizer.pad_token_id)
        pattern = evaluate.gate_pattern(mm, evals, tokenizer.pad_token_id)
        router = {"accuracy": acc, "confusion": confusion, "labels": mm.expert_names, "gate_pattern": pattern}
    return EvalResult(per, avg, general, router, seconds=time.perf_counter() - t0)
