"""The run report: ``report.json`` (machine-readable), ``report.md`` (the table) and PNG plots."""

from __future__ import annotations

import logging
from pathlib import Path

from loramix.artifact import write_json
from loramix.config import LoramixConfig, config_hash

logger = logging.getLogger(__name__)


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
    """Assemble, write and return the report. Loss curves go to ``curves.json`` and ``loss_curves.png``."""
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
        plot_report(report, curves, out)
    except ImportError:  # matplotlib is a dependency; a broken install should not lose the report
        logger.warning("matplotlib unavailable; skipped the plots")
    return report


def format_report(report: dict) -> str:
    """Markdown: exact match per domain and method, then router accuracy."""
    names = report["domains"]
    lines = [
        f"recipe `{report['recipe']}`, config {report['config_hash']}",
        "",
        "| method | " + " | ".join(names) + " | avg EM | avg loss |",
        "|---" * (len(names) + 3) + "|",
    ]
    for method, row in report["methods"].items():
        if "error" in row:
            lines.append(f"| {method} | " + " | ".join("-" for _ in names) + f" | error: {row['error'][:60]} | |")
            continue
        cells = [f"{row['per_domain'][n]['exact_match']:.3f}" for n in names]
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {row['avg']['exact_match']:.3f} | {row['avg']['loss']:.3f} |"
        )
    lines.append(f"\nrouter accuracy: {report['router']['accuracy']:.3f}")
    return "\n".join(lines)


def plot_report(report: dict, curves: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = report["domains"]
    methods = {m: r for m, r in report["methods"].items() if "error" not in r}
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 4))
    width = 0.8 / max(len(methods), 1)
    for i, (method, row) in enumerate(methods.items()):
        ax.bar(
            np.arange(len(names)) + i * width, [row["per_domain"][n]["exact_match"] for n in names], width, label=method
        )
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"exact match per domain ({report['recipe']})")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)

    labels = report["router"].get("labels", names)
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(labels), 2 + 0.8 * len(labels)))
    ax.imshow(np.array(report["router"]["confusion"]), cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    for (r, c), v in np.ndenumerate(np.array(report["router"]["confusion"])):
        ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for job, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=job, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
