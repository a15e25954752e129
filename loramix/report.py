"""The run report: ``report.json`` (machine-readable), ``report.md`` (the table) and PNG plots.

One report whoever ran the stages (``loramix demo`` or ``loramix run``): :func:`write_run_report`
takes the plan's typed results.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.artifact import write_json
from loramix.config import LoramixConfig, config_hash, dump_config
from loramix.plan import METHODS, EvalResult, LoraResult, Result, RouterResult
from loramix.serve_config import SERVE_JSON, saved_settings
from loramix.validation import took_off
from loramix.versions import POINTER, path_of, publish

logger = logging.getLogger(__name__)

# An expert this far below the multitask LoRA on its own domain is flagged as under-trained.
UNDERTRAINED_GAP = 0.05
TRAINING_KEYS = (
    "zero_stage",
    "num_workers",
    "cpu_threads",
    "steps",
    "max_steps",
    "stopped",
    "best_step",
    "cooldown_from",
    "rewarmed_at",
    "final_loss",
    "seconds",
    "trainable_params",
    "data",
    "warm_start",
    "node_ids",
    "losses",
    "val_losses",
)


def training_row(result: Result) -> dict:
    data = result.to_json()
    if isinstance(result, RouterResult):
        data |= {"zero_stage": None, "num_workers": 1}
    return {k: data[k] for k in TRAINING_KEYS if k in data}


def method_row(result: EvalResult) -> dict:
    if result.error is not None:
        return {"error": result.error}
    row = {"per_domain": result.per_domain, "avg": result.avg}
    if result.general is not None:
        row["general"] = result.general
    return row


def undertrained(cfg: LoramixConfig, results: dict[str, Result], methods: dict) -> list[str]:
    """Warnings for experts far from converged: an oracle score well below the multitask LoRA's on the
    expert's own domain, or a validation loss still falling when `expert.steps` ran out."""
    warnings = []
    oracle, multi = methods.get("oracle", {}), methods.get("multitask_lora", {})
    for d in cfg.data.domains:
        lora = results.get(f"expert/{d.name}")
        if not isinstance(lora, LoraResult):
            continue
        reasons = []
        if "per_domain" in oracle and "per_domain" in multi:
            own, multitask = oracle["per_domain"][d.name]["exact_match"], multi["per_domain"][d.name]["exact_match"]
            if own < multitask - UNDERTRAINED_GAP:
                reasons.append(f"its exact match {own:.3f} is below the multitask LoRA's {multitask:.3f} on `{d.name}`")
        if lora.stopped == "max_steps" and lora.still_improving and lora.val_losses:
            reasons.append(f"its validation loss was still falling at step {lora.steps} (`expert.steps`)")
        hint = ""
        if len(lora.val_losses) > 1 and not took_off(lora.val_losses, cfg.expert.takeoff):
            first = lora.val_losses[0][1]
            reasons.append(f"its validation loss never fell below {cfg.expert.takeoff:g} x its first value {first:.3f}")
            if "lm_head" not in cfg.expert.target_modules:
                hint = (
                    " If its answers use tokens the base rarely produces, add `lm_head` to `expert.target_modules` "
                    "(measured: an expert flat at ln 29 for 2000 steps learned its domain with it)."
                )
        if reasons:
            warnings.append(
                f"expert `{d.name}` looks under-trained: {'; '.join(reasons)}. Raise `expert.steps` "
                f"(now {cfg.expert.steps}) or `expert.lr` (now {cfg.expert.lr:g}), or check its data.{hint}"
            )
    return warnings


def finish_run(
    out: str | Path,
    cfg: LoramixConfig,
    results: dict[str, Result],
    *,
    timings: dict,
    cached: list[str],
    note: str = "",
    extra: dict | None = None,
) -> dict:
    """The last step of a run, once every stage succeeded: publish the evaluated mixture as the
    next artifact version, write the report and ``config.yaml``. Until then the folder's
    ``config.yaml``, report and ``artifact`` are the previous run's, whatever failed in between."""
    out = Path(out)
    mixture = results["eval/mixture"]
    scores = {
        "exact_match": (mixture.avg or {}).get("exact_match"),
        "per_domain": mixture.per_domain,
        "router_accuracy": (mixture.router or {}).get("accuracy"),
        "general": mixture.general,
    }
    version = publish(
        out, results["router"].path, extra={SERVE_JSON: saved_settings(cfg.serve)}, scores=scores, note=note
    )
    artifact = {"version": version, "path": str(path_of(out, version)), "pointer": str(out / POINTER)}
    report = write_run_report(
        out, cfg, results, timings=timings, cached=cached, extra={"artifact": artifact, **(extra or {})}
    )
    (out / "config.yaml").write_text(dump_config(cfg))
    return report


def write_run_report(
    out: str | Path,
    cfg: LoramixConfig,
    results: dict[str, Result],
    *,
    timings: dict,
    cached: list[str],
    extra: dict | None = None,
) -> dict:
    """Assemble and write the report of a finished plan (``results`` keyed by stage name)."""
    methods = {m: method_row(results[f"eval/{m}"]) for m in METHODS if f"eval/{m}" in results}
    mixture = results.get("eval/mixture")
    training = {k: training_row(v) for k, v in results.items() if isinstance(v, LoraResult | RouterResult)}
    warnings = undertrained(cfg, results, methods)
    warm = getattr(results.get("router"), "warm_start", None)
    if warm and "skipped" in warm:
        why = warm["skipped"]
        warnings.append(f"router.warm_start {warm['from']} was not used ({why}); the router trained from scratch.")
    extra = {"cached_stages": sorted(cached), "warnings": warnings, **(extra or {})}
    if "universal" in results:
        extra["universal"] = {"variant": cfg.universal.variant, "data": results["universal"].data}
    return write_report(
        out,
        cfg,
        methods=methods,
        router=(mixture.router if mixture else None) or {},
        training=training,
        timings=timings,
        extra=extra,
    )


def write_report(
    out: str | Path,
    cfg: LoramixConfig,
    *,
    methods: dict,
    router: dict,
    training: dict,
    timings: dict,
    extra: dict | None = None,
) -> dict:
    """Write and return the report. Loss curves go to ``curves.json`` and ``loss_curves.png``."""
    out = Path(out)
    curves = {job: t.pop("losses") for job, t in training.items() if "losses" in t}
    report = {
        "recipe": cfg.recipe,
        "domains": [d.name for d in cfg.data.domains],
        "config_hash": config_hash(cfg),
        "methods": methods,
        "router": router,
        "training": training,
        "timings": timings,
        **(extra or {}),
    }
    write_json(out / "report.json", report)
    write_json(out / "curves.json", curves)
    (out / "report.md").write_text(format_report(report) + "\n")
    try:
        from loramix.plots import plot_report  # matplotlib loads only when a report is plotted

        plot_report(report, curves, out)
    except ImportError:  # matplotlib is a dependency; a broken install should not lose the report
        logger.warning("matplotlib unavailable; skipped the plots")
    return report


def format_report(report: dict) -> str:
    """Markdown: exact match per domain and method (+ general skill), router accuracy, warnings."""
    names = report["domains"]
    general = any("general" in row for row in report["methods"].values())
    head = ["method", *names, "avg EM", "avg loss", *(["general EM"] if general else [])]
    lines = [
        f"recipe `{report['recipe']}`, config {report['config_hash']}",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    for method, row in report["methods"].items():
        if "error" in row:
            lines.append(f"| {method} | " + " | ".join("-" for _ in names) + f" | error: {row['error'][:60]} | |")
            continue
        cells = [f"{row['per_domain'][n]['exact_match']:.3f}" for n in names]
        cells += [f"{row['avg']['exact_match']:.3f}", f"{row['avg']['loss']:.3f}"]
        if general:
            cells.append(f"{row['general']['exact_match']:.3f}" if "general" in row else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report["router"]:
        lines.append(f"\nrouter accuracy: {report['router']['accuracy']:.3f}")
    warm = report.get("training", {}).get("router", {}).get("warm_start")
    if warm and "kept" in warm:
        kept = ", ".join(warm["kept"]) or "no expert"
        lines.append(f"\nrouter warm-started from {warm['from']} (rows kept for {kept})")
    for warning in report.get("warnings", []):
        lines.append(f"\nWARNING: {warning}")
    return "\n".join(lines)
