"""The whole pipeline in one process without Ray: ``loramix demo CONFIG``.

Same stage bodies as ``loramix run`` (:mod:`loramix.stages`), run one after another with a plain
torch optimizer instead of DeepSpeed workers. Useful to try a config on a laptop and as the
reference the Ray pipeline is compared against.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

from loramix import data, loops, stages, synthetic
from loramix.config import LoramixConfig, dump_config
from loramix.report import write_report
from loramix.serve_config import save_serve_config

logger = logging.getLogger(__name__)


def ensure_demo_data(cfg: LoramixConfig) -> None:
    """Write the demo JSONL files the config points at, if missing and named after a demo task."""
    for d in cfg.data.domains:
        for split, path, seed, n in (("train", d.train, 0, 4000), ("eval", d.eval, 1, 200)):
            if path and not Path(path).exists() and d.name in synthetic.TASKS:
                synthetic.write_jsonl(synthetic.make_rows(d.name, n, seed=seed), path)
                logger.info("wrote demo %s data for %s to %s", split, d.name, path)


def _quiet(desc: str, total: int):
    return lambda metrics, ckpt=None: None


def _train_lora(job, optim, examples, cfg, base, tokenizer, path, progress, universal=None) -> dict:
    """Train one LoRA on a copy of ``base`` and save it (the trained adapter alone) at ``path``."""
    t = time.perf_counter()
    it = data.batches(examples, optim.batch_size, tokenizer.pad_token_id, seed=cfg.seed, steps=optim.steps)
    model, summary = loops.train_expert(
        optim, copy.deepcopy(base), it, report=progress(job, optim.steps), universal=universal
    )
    model.save_pretrained(path, selected_adapters=["default"])
    return {
        "zero_stage": None,
        "num_workers": 1,
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "seconds": time.perf_counter() - t,
        "losses": summary["losses"],
    }


def run_demo(cfg: LoramixConfig, out: str | Path, progress=_quiet) -> dict:
    """Run every stage in-process; returns (and writes) the report.

    Args:
        progress: ``progress(desc, total_steps) -> report`` callback factory (a tqdm bar in the CLI).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    timings, training, t0 = {}, {}, time.perf_counter()
    ensure_demo_data(cfg)
    base_info = stages.prepare_base(cfg, out / "base", progress("base", cfg.model.synthetic.pretrain_steps))
    timings["base"] = time.perf_counter() - t0
    tokenizer = stages.load_tokenizer(base_info)
    train = stages.domain_examples(cfg, tokenizer, "train")
    base = stages.load_base(cfg, base_info)
    all_examples = [e for ex in train.values() for e in ex]
    universal = None
    if cfg.universal.enabled:  # MoDULA: the universal LoRA first; experts train on top of it, frozen
        universal = str(out / "universal")
        training["universal"] = _train_lora(
            "universal", stages.universal_optim(cfg), all_examples, cfg, base, tokenizer, universal, progress
        )
    adapters = {}
    for name, ex in train.items():
        adapters[name] = str(out / "experts" / name)
        training[f"expert/{name}"] = _train_lora(
            f"expert/{name}", cfg.expert, ex, cfg, base, tokenizer, adapters[name], progress, universal
        )
    multitask = str(out / "multitask_lora")
    training["multitask_lora"] = _train_lora(
        "multitask_lora", stages.multitask_optim(cfg), all_examples, cfg, base, tokenizer, multitask, progress
    )
    timings |= {job: t["seconds"] for job, t in training.items()}
    t = time.perf_counter()
    summary = stages.train_router_stage(
        cfg, base_info, adapters, out / "artifact", progress("router", cfg.router.steps), universal=universal
    )
    save_serve_config(cfg.serve, out / "artifact")
    training["router"] = summary | {"zero_stage": None, "num_workers": 1}
    timings["router"] = time.perf_counter() - t
    t = time.perf_counter()
    methods = {
        m: stages.evaluate_method(
            m, cfg, base_info, adapters, artifact=str(out / "artifact"), multitask=multitask, universal=universal
        )
        for m in stages.METHODS
    }
    router = methods["mixture"].pop("router")
    timings["eval"] = time.perf_counter() - t
    return write_report(out, cfg, methods=methods, router=router, training=training, timings=timings)
