"""``loramix add-domain``: one new expert, a refreshed router, old experts untouched.

Reruns the pipeline of ``OUTPUT`` with one more domain. Every old expert's input hash is
unchanged, so it is reused byte for byte; only the new expert, the router, the multitask
baseline and evaluation run. The report records the compute spent on the new expert against
retraining one multitask LoRA on all domains, and each old domain's accuracy before and after.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.artifact import read_json, write_json
from loramix.config import ConfigError, DomainConfig, load_config
from loramix.lock import output_lock
from loramix.report import format_report

logger = logging.getLogger(__name__)


def add_domain(output: str | Path, name: str, train: str, eval_path: str | None, address: str | None = None) -> dict:
    """Train ``name`` into the run at ``output`` (all or nothing: a failure leaves the run as it was)."""
    out = Path(output)
    with output_lock(out):
        return _add_domain(out, name, train, eval_path, address)


def _add_domain(out: Path, name: str, train: str, eval_path: str | None, address: str | None) -> dict:
    from pipelines.run import run_pipeline

    if not (out / "config.yaml").is_file() or not (out / "report.json").is_file():
        raise ConfigError(f"{str(out)!r} holds no finished run (config.yaml + report.json); run `loramix run` first.")
    cfg = load_config(out / "config.yaml")
    if name in [d.name for d in cfg.data.domains]:
        raise ConfigError(f"domain {name!r} already exists in {str(out)!r}; pick another `--name`.")
    before = read_json(out / "report.json")
    domain = DomainConfig(
        name=name, train=str(Path(train).resolve()), eval=eval_path and str(Path(eval_path).resolve())
    )
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"domains": [*cfg.data.domains, domain]})})
    report = run_pipeline(cfg, out, address, note=f"add-domain {name}")
    old = before["methods"]["mixture"]["per_domain"]
    new = report["methods"]["mixture"]["per_domain"]
    new_steps = report["training"][f"expert/{name}"]["steps"]
    multitask_steps = report["training"]["multitask_lora"]["steps"]
    report["add_domain"] = {
        "name": name,
        "new_expert_steps": new_steps,
        "multitask_steps_all_domains": multitask_steps,
        "compute_ratio": new_steps / max(multitask_steps, 1),  # same batch size and model: steps are the compute
        "retrained_stages": sorted(set(report["training"]) - set(report.get("cached_stages", []))),
        "old_domains": {
            d: {
                "before": old[d]["exact_match"],
                "after": new[d]["exact_match"],
                "delta": new[d]["exact_match"] - old[d]["exact_match"],
            }
            for d in old
        },
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(format_report(report) + "\n")
    return report
