"""Stage bodies shared by the in-process demo and the Ray pipeline: plain functions, no Ray.

    base -> (universal) -> experts -> multitask_lora -> router -> eval -> export

Each takes the validated config and paths, does its work and returns a JSON-able summary; the
Ray shells in ``pipelines/`` decide where and when each runs and cache them by input hash.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from loramix import data, evaluate, loops, synthetic
from loramix.config import LoramixConfig
from loramix.merge import merge_adapters
from loramix.model import MixtureModel

logger = logging.getLogger(__name__)

METHODS = ("base", "oracle", "multitask_lora", "merge_linear", "merge_ties", "mixture")


def multitask_optim(cfg: LoramixConfig):
    """The multitask baseline's optimiser: the experts' settings with ``N x expert.steps``, the same total budget."""
    return cfg.expert.model_copy(update={"steps": cfg.expert.steps * len(cfg.data.domains)})


def universal_optim(cfg: LoramixConfig):
    """The universal LoRA's optimiser: the experts' settings overridden by the `universal` section."""
    return cfg.expert.model_copy(update=cfg.universal.model_dump(exclude={"enabled", "variant"}))


def _quiet(metrics, ckpt=None) -> None:
    return None


def prepare_base(cfg: LoramixConfig, out_dir: str | Path, report=_quiet) -> dict:
    """Pre-train and save the demo base (``model.base: synthetic``) or name the real one.

    Returns:
        ``{"base": <dir or hub id>, "tokenizer": <dir or hub id>}``.
    """
    if cfg.model.base != "synthetic":
        return {"base": cfg.model.base, "tokenizer": cfg.model.tokenizer or cfg.model.base}
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
        optim = loops.OptimConfig(steps=s.pretrain_steps, batch_size=s.batch_size, lr=s.lr)
        it = data.batches(examples, s.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=s.pretrain_steps)
        loops.run_steps(
            base,
            it,
            loops.lm_loss,
            loops.TorchStepper(base.parameters(), optim),
            report=report,
            log_every=cfg.train.log_every,
        )
    base.eval().save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"base": str(out_dir), "tokenizer": str(out_dir)}


def load_base(cfg: LoramixConfig, base_info: dict):
    """The frozen base in ``model.dtype``, on this process's accelerator (a Ray task's GPU) or the CPU."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_info["base"], dtype=getattr(torch, cfg.model.dtype))
    return base.to(loops.accelerator()).eval()


def load_tokenizer(base_info: dict):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_info["tokenizer"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # real tokenizers often lack one; padding is masked anyway
    return tok


def domain_examples(
    cfg: LoramixConfig, tokenizer, split: str, names: list[str] | None = None
) -> dict[str, list[data.Example]]:
    """Tokenised examples per domain for ``split`` (``train`` or ``eval``), domain index = config order.

    Args:
        names: only these domains (default: all); an expert's trainer tokenises just its own.
    """
    out = {}
    for i, d in enumerate(cfg.data.domains):
        if names is not None and d.name not in names:
            continue
        path = getattr(d, split)
        if path is None:
            raise ValueError(f"domain {d.name!r} has no `{split}` file; set `data.domains[{i}].{split}`.")
        fields = (cfg.data.prompt_field, cfg.data.completion_field)
        ex = data.load_domain(path, tokenizer, cfg.data.max_length, i, *fields)[1]
        out[d.name] = ex[: cfg.data.eval_limit] if split == "eval" else ex
    return out


def router_setup(cfg: LoramixConfig, base_info: dict, adapters: dict[str, str], tokenizer, universal=None):
    """The mixture over frozen ``adapters`` with a fresh router, and its training batches."""
    train = domain_examples(cfg, tokenizer, "train")
    mm = MixtureModel.from_adapters(
        load_base(cfg, base_info),
        adapters,
        router=cfg.recipe,
        top_k=cfg.router.top_k,
        universal=universal,
        variant=cfg.universal.variant,
        **router_kwargs(cfg),
    )
    mixed = [e for name in mm.expert_names for e in train[name]]
    it = data.batches(mixed, cfg.router.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=cfg.router.steps)
    return mm, it


def train_router_stage(
    cfg: LoramixConfig,
    base_info: dict,
    adapters: dict[str, str],
    out_dir: str | Path,
    report=_quiet,
    universal: str | None = None,
) -> dict:
    """Freeze base + experts, train the recipe's router, save the mixture artifact to ``out_dir``."""
    tokenizer = load_tokenizer(base_info)
    mm, it = router_setup(cfg, base_info, adapters, tokenizer, universal)
    summary = loops.train_router(cfg.router, mm, it, report=report, recipe=cfg.recipe, log_every=cfg.train.log_every)
    base_path = base_info["base"]
    mm.save_pretrained(out_dir, base_path=str(Path(base_path).resolve()) if Path(base_path).is_dir() else base_path)
    tokenizer.save_pretrained(Path(out_dir) / "tokenizer")
    return {k: summary[k] for k in ("steps", "final_loss", "losses", "seconds")}


def router_kwargs(cfg: LoramixConfig) -> dict:
    return {"temperature": cfg.router.temperature} if cfg.recipe == "mole" else {}


class _Bound:
    """Adds fixed keyword arguments to ``generate``/``__call__`` (the oracle's expert weights)."""

    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs

    def generate(self, **kw):
        return self.model.generate(**kw, **self.kwargs)

    def __call__(self, **kw):
        return self.model(**kw, **self.kwargs)


def method_models(
    method: str,
    cfg: LoramixConfig,
    base_info: dict,
    adapters: dict[str, str],
    *,
    artifact: str | None,
    multitask: str | None,
    universal: str | None = None,
):
    """``domain -> model`` builder for one evaluated method (each model has ``generate`` and ``__call__``).

    With a MoDULA ``universal`` LoRA the experts were trained on top of it, so the oracle and the
    merges keep it under them (the mixture artifact holds it already).
    """
    from peft import PeftModel

    base = load_base(cfg, base_info)
    variant = cfg.universal.variant
    if method == "base":
        return lambda d: base
    if method == "oracle":
        return lambda d: _Bound(
            MixtureModel.from_adapters(
                copy.deepcopy(base), {d: adapters[d]}, router=None, universal=universal, variant=variant
            ),
            expert_weights=[1.0],
        )
    if method == "multitask_lora":
        model = PeftModel.from_pretrained(base, multitask).eval()
        return lambda d: model
    if method in ("merge_linear", "merge_ties"):
        if universal is not None:
            if variant == "res":
                raise ValueError("merging experts is undefined for MoDULA-Res (experts read the universal output).")
            base = PeftModel.from_pretrained(base, universal).merge_and_unload()
        model = merge_adapters(base, adapters, combination_type=method.removeprefix("merge_"))
        return lambda d: model
    if method == "mixture":
        model = MixtureModel.from_pretrained(artifact, base_model=base)
        return lambda d: model
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")


def evaluate_method(
    method: str,
    cfg: LoramixConfig,
    base_info: dict,
    adapters: dict[str, str],
    *,
    artifact: str | None = None,
    multitask: str | None = None,
    universal: str | None = None,
) -> dict:
    """Exact match and completion loss of one method on every domain's eval split.

    For ``mixture`` the result also holds ``router``: accuracy and confusion matrix, scored on
    the same loaded model and eval prompts. A method that cannot be built for this run (e.g.
    PEFT refusing a linear merge of different ranks) gives ``{"error": reason}`` rather than
    failing the run.
    """
    tokenizer = load_tokenizer(base_info)
    evals = domain_examples(cfg, tokenizer, "eval")
    try:
        build = method_models(
            method, cfg, base_info, adapters, artifact=artifact, multitask=multitask, universal=universal
        )
    except ValueError as err:
        return {"error": str(err)}
    per = {}
    for name, examples in evals.items():
        em, loss = evaluate.score(build(name), examples, tokenizer)
        per[name] = {"exact_match": em, "loss": loss}
    avg = {k: sum(v[k] for v in per.values()) / len(per) for k in ("exact_match", "loss")}
    result = {"per_domain": per, "avg": avg}
    if method == "mixture":
        mm = build(None)
        acc, confusion = evaluate.router_confusion(mm, evals, tokenizer.pad_token_id)
        result["router"] = {"accuracy": acc, "confusion": confusion, "labels": mm.expert_names}
    return result
