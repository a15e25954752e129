"""The shipped recipe configs side by side, on the demo world or on a held-out one:
``python -m benchmarks.recipes [--world demo|heldout|fresh] [--configs quickstart mole ...] [--output DIR]``.

``heldout`` is a world none of the configs were tuned on: four other cue-marked, conflicting
transformations whose cue words are spelled out in characters (not single tokens), one answering
in characters the base never produced (upper case) and two with answers twice as long. ``fresh``
is another, made after every setting was fixed (early stopping's re-warmup included): answers
in digits, with a separator, reordered pairs and a descending sort. Each
config runs as ``loramix run`` runs it (on Ray), with only its domains replaced. Writes
``DIR/recipes.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

from loramix.config import load_config
from loramix.synthetic import write_jsonl
from pipelines.run import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("quickstart", "mole", "modula", "modula_res")

HELDOUT = {
    "upper": str.upper,  # characters the base never produced
    "double": lambda s: "".join(c + c for c in s),  # twice as long
    "mirror": lambda s: s + s[::-1],  # twice as long
    "mask": lambda s: "".join("*" if c in "aeiou" else c for c in s),
}


FRESH = {
    "digits": lambda s: "".join(str((ord(c) - ord("a")) % 10) for c in s),  # characters the base never produced
    "echo": lambda s: f"{s}-{s}",  # twice as long, with a separator
    "pairs": lambda s: "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2)),
    "descend": lambda s: "".join(sorted(s, reverse=True)),
}
WORLDS = {"heldout": HELDOUT, "fresh": FRESH}


def write_world(world: str, root: Path, train: int = 4000, evals: int = 200) -> list[dict]:
    """Write a non-demo world's train/eval files under ``root``; returns its ``data.domains``."""
    domains = []
    for task, fn in WORLDS[world].items():
        rows = {}
        for split, n, seed in (("train", train, 0), ("eval", evals, 1)):
            rng = random.Random(f"{world}-{task}-{seed}")
            words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 7))) for _ in range(n)]
            rows[split] = write_jsonl(
                [{"prompt": f"{task} {w}=", "completion": fn(w)} for w in words], root / f"{task}.{split}.jsonl"
            )
        domains.append({"name": task, "train": str(rows["train"]), "eval": str(rows["eval"])})
    return domains


def summarize(report: dict, seconds: float) -> dict:
    methods = report["methods"]
    mixture, oracle = methods["mixture"], methods["oracle"]
    best_merge = max(
        (m for m in ("merge_linear", "merge_ties", "merge_cat") if "avg" in methods.get(m, {})),
        key=lambda m: methods[m]["avg"]["exact_match"],
        default=None,
    )
    training = report["training"]
    return {
        "per_domain": {d: v["exact_match"] for d, v in mixture["per_domain"].items()},
        "mixture": mixture["avg"]["exact_match"],
        "oracle": oracle["avg"]["exact_match"],
        "multitask": methods["multitask_lora"]["avg"]["exact_match"],
        "best_merge": (best_merge, methods[best_merge]["avg"]["exact_match"]) if best_merge else None,
        "router_accuracy": report["router"]["accuracy"],
        "general": {m: r["general"]["exact_match"] for m, r in methods.items() if "general" in r},
        "expert_params": training[f"expert/{report['domains'][0]}"]["trainable_params"],
        "expert_steps": {d: training[f"expert/{d}"]["steps"] for d in report["domains"]},
        "warnings": report.get("warnings", []),
        "seconds": seconds,
    }


def run(configs, world: str, output: Path, overrides=()) -> dict:

    results = {}
    domains = write_world(world, output / "data") if world in WORLDS else None
    for name in configs:
        over = list(overrides) + ([f"data.domains={json.dumps(domains)}"] if domains else [])
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", over)
        t0 = time.perf_counter()
        report = run_pipeline(cfg, output / name)
        results[name] = summarize(report, time.perf_counter() - t0)
        (output / "recipes.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """Two markdown tables: the configs side by side, then the mixture per domain."""
    lines = [
        "| config | mixture | oracle | multitask | best merge | router acc | general (mixture / base) "
        "| expert params | expert steps | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        merge = f"{r['best_merge'][1]:.3f} ({r['best_merge'][0]})" if r["best_merge"] else "-"
        general = f"{r['general'].get('mixture', 0):.3f} / {r['general'].get('base', 0):.3f}"
        steps = sum(r["expert_steps"].values())
        lines.append(
            f"| {name} | {r['mixture']:.3f} | {r['oracle']:.3f} | {r['multitask']:.3f} | {merge} | "
            f"{r['router_accuracy']:.3f} | {general} | {r['expert_params']:,} | {steps:,} | {r['seconds']:.0f} |"
        )
    domains = list(next(iter(results.values()))["per_domain"]) if results else []
    lines += ["", "| config | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_domain'][d]:.3f}" for d in domains) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["demo", *WORLDS], default="demo")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--output", default="out/recipes")
    parser.add_argument("overrides", nargs="*", help="key.path=value for every config, e.g. router.top_k=1")
    args = parser.parse_args()
    results = run(args.configs, args.world, Path(args.output) / args.world, args.overrides)
    print(table(results))


if __name__ == "__main__":
    main()
