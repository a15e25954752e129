"""Changing a finished run's experts: ``add-domain``, ``add-expert``, ``replace-expert``,
``remove-expert``.

Each rewrites the run's config with one domain added, replaced or removed, and reruns its
pipeline: every other expert's input hash is unchanged, so it is reused byte for byte; the
router, the baselines and the evaluation rerun. The result is published as a new artifact
version whose manifest records what changed (``loramix versions``); ``report.json`` → ``change``
compares every kept domain before and after. All or nothing: until the run finishes, the
folder's config, report and current version stay the previous ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from loramix import versions
from loramix.adapters import copy_adapter
from loramix.artifact import file_digest, read_json, write_json
from loramix.config import ConfigError, DomainConfig, LoramixConfig, load_config
from loramix.experts import Expert
from loramix.lock import output_lock
from loramix.report import format_report
from pipelines.run import run_pipeline

logger = logging.getLogger(__name__)

Edit = Callable[[list[DomainConfig]], list[DomainConfig]]


def add_domain(output: str | Path, name: str, train: str, eval_path: str | None = None, address=None) -> dict:
    """Train an expert for the new domain ``name`` into the run at ``output``."""

    def edit(domains):
        return [*domains, DomainConfig(name=name, train=_abs(train), eval=_abs(eval_path))]

    return _change(output, "add-domain", name, edit, address, new=True)


def add_expert(
    output: str | Path, name: str, adapter: str, train: str, eval_path: str | None = None, address=None
) -> dict:
    """Bring ``adapter`` (a PEFT LoRA trained elsewhere on the run's base) in as expert ``name``;
    ``train`` rows (prompts of its domain) teach the router when to pick it."""

    def edit(domains):
        staged = stage_adapter(output, name, adapter)
        return [*domains, DomainConfig(name=name, train=_abs(train), eval=_abs(eval_path), adapter=staged)]

    return _change(output, "add-expert", name, edit, address, new=True)


def replace_expert(
    output: str | Path,
    name: str,
    *,
    train: str | None = None,
    adapter: str | None = None,
    eval_path: str | None = None,
    address=None,
) -> dict:
    """Retrain expert ``name`` on new ``train`` rows, or swap in ``adapter``; the router is refreshed."""
    if not (train or adapter):
        raise ConfigError("replace-expert needs `--train` (retrain on these rows) or `--adapter` (use this LoRA).")

    def edit(domains):
        staged = stage_adapter(output, name, adapter) if adapter else None
        return [
            d.model_copy(update={"train": _abs(train) or d.train, "eval": _abs(eval_path) or d.eval, "adapter": staged})
            if d.name == name
            else d
            for d in domains
        ]

    return _change(output, "replace-expert", name, edit, address)


def remove_expert(output: str | Path, name: str, address=None) -> dict:
    """Drop expert ``name``; the router is retrained over the others."""
    return _change(output, "remove-expert", name, lambda domains: [d for d in domains if d.name != name], address)


def stage_adapter(output: str | Path, name: str, adapter: str) -> str:
    """Check ``adapter``'s files (a LoRA, safetensors, supported options: seconds, before anything
    runs) and copy them under ``OUTPUT/inputs/adapters/<digest>/``, so the run keeps working
    after the original folder moves; the base and shapes are checked by the run's adapter stage."""
    Expert.from_dir(name, adapter)
    dst = Path(output).resolve() / "inputs" / "adapters" / file_digest(adapter)
    if not dst.exists():
        copy_adapter(adapter, dst)
    return str(dst)


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def _change(output: str | Path, kind: str, name: str, edit: Edit, address, *, new: bool = False) -> dict:
    out = Path(output).resolve()
    with output_lock(out):
        if not (out / "config.yaml").is_file() or not (out / "report.json").is_file():
            raise ConfigError(
                f"{str(out)!r} holds no finished run (config.yaml + report.json); run `loramix run` first."
            )
        cfg = load_config(out / "config.yaml")
        names = [d.name for d in cfg.data.domains]
        if new and name in names:
            raise ConfigError(f"expert {name!r} already exists in {str(out)!r}; pick another `--name`.")
        if not new and name not in names:
            raise ConfigError(f"{str(out)!r} has no expert {name!r}; it has {names}.")
        before = read_json(out / "report.json")
        # The router retrains over the new set of experts, starting from the current one: the experts
        # both have keep their learned routing (measured: see the README's add-domain results).
        router = cfg.router.model_copy(update={"warm_start": str(versions.resolve(out))})
        domains = edit(cfg.data.domains)
        data = cfg.data.model_copy(update={"domains": domains})
        changed = cfg.model_copy(update={"data": data, "router": router, "universal": pinned(cfg)})
        changed = LoramixConfig.model_validate(changed.model_dump())  # the cross-checks (top_k <= experts, ...)
        report = run_pipeline(changed, out, address, note=f"{kind} {name}")
        report["change"] = summary(kind, name, changed, before, report)
        write_json(out / "report.json", report)
        (out / "report.md").write_text(format_report(report) + "\n")
        return report


def pinned(cfg: LoramixConfig):
    """``universal`` with the domain files it trained on pinned (MoDULA's stage 1 is done once): a universal
    LoRA that draws from the domains would otherwise retrain when one changes, and every Res expert with it."""
    u = cfg.universal
    if not u.enabled or u.domain_files is not None or not u.draws_from_domains:
        return u
    return u.model_copy(update={"domain_files": [d.train for d in cfg.data.domains]})


def summary(kind: str, name: str, cfg: LoramixConfig, before: dict, report: dict) -> dict:
    """What a change cost and did: the stages it ran, the changed expert's steps against retraining
    one LoRA on every domain, and each kept domain's exact match before and after."""
    old = before["methods"]["mixture"]["per_domain"]
    new = report["methods"]["mixture"]["per_domain"]
    training = report["training"]
    # What retraining one LoRA on every domain would cost: the multitask baseline's budget, which
    # is the experts' steps together (also without `baselines`).
    all_steps = sum(training[f"expert/{d.name}"]["steps"] for d in cfg.data.domains)
    steps = training.get(f"expert/{name}", {}).get("steps", 0) if f"expert/{name}" not in report["cached_stages"] else 0
    return {
        "kind": kind,
        "name": name,
        "version": report["artifact"]["version"],
        "expert_steps": steps,
        "multitask_steps_all_domains": all_steps,
        "compute_ratio": steps / max(all_steps, 1),  # same batch size and model: steps are the compute
        "retrained_stages": sorted(set(training) - set(report.get("cached_stages", []))),
        "kept_domains": {
            d: {
                "before": old[d]["exact_match"],
                "after": new[d]["exact_match"],
                "delta": new[d]["exact_match"] - old[d]["exact_match"],
            }
            for d in old
            if d in new and d != name
        },
    }
