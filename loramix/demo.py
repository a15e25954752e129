"""The offline demo, end to end on one machine without Ray: data, base, experts, router, eval.

``python -m loramix.demo configs/quickstart.yaml`` (or ``loramix demo``). The Ray pipeline
(``loramix run``) runs the same stages distributed; this is the core-only path.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch

from loramix import data, evaluate, loops, synthetic
from loramix.artifact import write_json
from loramix.config import LoramixConfig
from loramix.merge import merge_adapters
from loramix.model import MixtureModel

logger = logging.getLogger(__name__)


def ensure_demo_data(cfg: LoramixConfig) -> None:
    """Write the demo JSONL files the config points at, if they are missing and named after demo tasks."""
    for d in cfg.data.domains:
        for split, path, seed, n in (("train", d.train, 0, 4000), ("eval", d.eval, 1, 200)):
            if path and not Path(path).exists() and d.name in synthetic.TASKS:
                synthetic.write_jsonl(synthetic.make_rows(d.name, n, seed=seed), path)
                logger.info("wrote demo %s data for %s to %s", split, d.name, path)


def _quiet(desc: str, total: int):
    return lambda metrics, ckpt=None: None


def pretrain_demo_base(cfg: LoramixConfig, tokenizer, report=lambda m, c=None: None):
    """Build the tiny Llama and pre-train it on the copy task (the shared format)."""
    s = cfg.model.synthetic
    torch.manual_seed(cfg.seed)
    base = synthetic.build_base(tokenizer, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                                num_layers=s.num_layers, num_heads=s.num_heads, max_length=cfg.data.max_length)  # fmt: skip
    if s.pretrain_steps:
        rows = synthetic.make_rows("copy", 20000, seed=cfg.seed)
        examples = data.tokenize_rows(rows, tokenizer, cfg.data.max_length)
        optim = loops.OptimConfig(steps=s.pretrain_steps, batch_size=s.batch_size, lr=s.lr)
        stepper = loops.TorchStepper(base.parameters(), optim)
        it = data.batches(examples, s.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=s.pretrain_steps)
        loops.run_steps(base, it, loops.lm_loss, stepper, report=report, log_every=cfg.train.log_every)
    return base.eval()


def run_demo(cfg: LoramixConfig, out: str | Path, progress=_quiet) -> dict:
    """Run every stage in-process; returns (and writes) the report.

    Args:
        progress: ``progress(desc, total_steps) -> report`` callback factory (a tqdm bar in the CLI).
    """
    out = Path(out)
    timings, t0 = {}, time.perf_counter()
    ensure_demo_data(cfg)
    tokenizer = synthetic.build_tokenizer([d.name for d in cfg.data.domains] + ["copy"])
    base = pretrain_demo_base(cfg, tokenizer, progress("base", cfg.model.synthetic.pretrain_steps))
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base")
    timings["base"] = time.perf_counter() - t0
    pad, names = tokenizer.pad_token_id, [d.name for d in cfg.data.domains]
    train_ex, eval_ex = {}, {}
    for i, d in enumerate(cfg.data.domains):
        train_ex[d.name] = data.load_domain(d.train, tokenizer, cfg.data.max_length, i)[1]
        eval_ex[d.name] = data.load_domain(d.eval, tokenizer, cfg.data.max_length, i)[1][: cfg.data.eval_limit]
    adapters = {}
    for name in names:
        t = time.perf_counter()
        it = data.batches(train_ex[name], cfg.expert.batch_size, pad, seed=cfg.seed, steps=cfg.expert.steps)
        model, summary = loops.train_expert(cfg.expert, copy.deepcopy(base), it, report=progress(name, cfg.expert.steps))
        adapters[name] = str(out / "experts" / name)
        model.save_pretrained(adapters[name])
        timings[f"expert/{name}"] = time.perf_counter() - t
        logger.info("expert %s: final loss %.4f in %.0fs", name, summary["final_loss"], timings[f"expert/{name}"])
    t = time.perf_counter()
    mm = MixtureModel.from_adapters(copy.deepcopy(base), adapters, router=cfg.recipe, top_k=cfg.router.top_k)
    mixed = [e for n in names for e in train_ex[n]]
    it = data.batches(mixed, cfg.router.batch_size, pad, seed=cfg.seed, steps=cfg.router.steps)
    loops.train_router(cfg.router, mm, it, report=progress("router", cfg.router.steps), recipe=cfg.recipe)
    timings["router"] = time.perf_counter() - t
    mm.save_pretrained(out / "artifact", base_path=str((out / "base").resolve()))
    methods = {
        "base": lambda n: base,
        "oracle": lambda n: MixtureModel.from_adapters(copy.deepcopy(base), {n: adapters[n]}, router=None),
        "merge_linear": lambda n: merge_adapters(copy.deepcopy(base), adapters, combination_type="linear"),
        "merge_ties": lambda n: merge_adapters(copy.deepcopy(base), adapters, combination_type="ties"),
        "mixture": lambda n: mm,
    }
    report = {"recipe": cfg.recipe, "domains": names, "methods": {}}
    for method, build in methods.items():
        per = {}
        shared = None if method == "oracle" else build(None)
        for n in names:
            model = shared or build(n)
            kwargs = {"expert_weights": [1.0]} if method == "oracle" else {}
            per[n] = evaluate.exact_match(_Bound(model, kwargs), eval_ex[n], tokenizer)
        report["methods"][method] = {"per_domain": per, "avg": sum(per.values()) / len(per)}
    acc, confusion = evaluate.router_confusion(mm, eval_ex, pad)
    report["router"] = {"accuracy": acc, "confusion": confusion}
    report["timings"] = timings | {"total": time.perf_counter() - t0}
    write_json(out / "report.json", report)
    return report


class _Bound:
    """Adds fixed keyword arguments to ``generate`` (e.g. the oracle's expert weights)."""

    def __init__(self, model, kwargs):
        self.model, self.kwargs = model, kwargs

    def generate(self, **kw):
        return self.model.generate(**kw, **self.kwargs)


def format_report(report: dict) -> str:
    names = report["domains"]
    lines = ["| method | " + " | ".join(names) + " | avg |", "|---" * (len(names) + 2) + "|"]
    for method, row in report["methods"].items():
        cells = [f"{row['per_domain'][n]:.3f}" for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['avg']:.3f} |")
    lines.append(f"\nrouter accuracy: {report['router']['accuracy']:.3f}")
    return "\n".join(lines)
