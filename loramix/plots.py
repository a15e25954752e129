"""The report's plots: accuracy per domain, router confusion, gate pattern, loss curves (PNG)."""

from __future__ import annotations

from pathlib import Path


def plot_report(report: dict, curves: dict, out: Path) -> None:
    import matplotlib  # the Agg backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # the Agg backend is chosen before pyplot loads

    for name, draw in (
        ("accuracy.png", _accuracy),
        ("confusion.png", _confusion),
        ("gates.png", _gates),
        ("loss_curves.png", _curves),
    ):
        fig = draw(plt, report, curves)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)


def _accuracy(plt, report, curves):
    import numpy as np  # numpy comes with matplotlib; loaded only when plotting

    names = report["domains"]
    methods = {m: r for m, r in report["methods"].items() if "error" not in r}
    columns = names + (["general"] if any("general" in r for r in methods.values()) else [])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(columns), 4))
    width = 0.8 / max(len(methods), 1)
    for i, (method, row) in enumerate(methods.items()):
        values = [row["per_domain"][n]["exact_match"] for n in names]
        values += [row["general"]["exact_match"] if "general" in row else 0.0] * (len(columns) - len(names))
        ax.bar(np.arange(len(columns)) + i * width, values, width, label=method)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, columns)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3)
    ax.set_title(f"exact match per domain ({report['recipe']})")
    return fig


def _confusion(plt, report, curves):
    import numpy as np  # numpy comes with matplotlib; loaded only when plotting

    router = report["router"]
    if not router:
        return None
    labels, confusion = router["labels"], np.array(router["confusion"])
    fig, ax = plt.subplots(figsize=(2 + 0.8 * len(labels), 2 + 0.8 * len(labels)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    for (r, c), v in np.ndenumerate(confusion):
        ax.text(c, r, str(v), ha="center", va="center", fontsize=8)
    return fig


def _gates(plt, report, curves):
    """One heatmap per domain: mean gate of each expert (columns) at each routing decision (rows)."""
    import numpy as np  # numpy comes with matplotlib; loaded only when plotting

    pattern = report["router"].get("gate_pattern") if report["router"] else None
    if not pattern or not pattern["domains"]:
        return None
    domains, where, experts = list(pattern["domains"]), pattern["where"], pattern["experts"]
    fig, axes = plt.subplots(
        1, len(domains), figsize=(1 + 1.6 * len(domains) + 0.3 * len(experts), 1.5 + 0.18 * len(where)), squeeze=False
    )
    for ax, domain in zip(axes[0], domains):
        ax.imshow(np.array(pattern["domains"][domain]), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(domain, fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=90, fontsize=7)
        ax.set_yticks(range(len(where)), where if ax is axes[0][0] else [""] * len(where), fontsize=6)
    fig.suptitle(f"mean gate per routing decision ({report['recipe']})", fontsize=10)
    return fig


def _curves(plt, report, curves):
    fig, ax = plt.subplots(figsize=(6, 4))
    for job, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=job, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7)
    return fig
