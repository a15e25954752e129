"""How reliably one expert learns its domain, over seeds:
``python -m benchmarks.expert_seeds RUN_DIR --domains swap reverse --seeds 0 1 2 3 [--set expert.rank=16]``.

A pipeline run is one sample of every expert's training, and on the synthetic worlds a domain's
validation loss sits on a plateau for a random number of steps before it falls (the demo's
`swap`: 300-550 steps over four seeds; `reverse` once not in 1,000). One run cannot tell a
setting that helps from a lucky sample. This trains each (domain, seed) in its own process, one
thread each, ``--jobs`` at a time, from RUN_DIR's base and data (a ``loramix run`` directory
whose base stage finished) with its ``expert`` section plus the overrides, for ``expert.steps``
steps **without early stopping** (``--early-stopping``: with the pipeline's rule, reporting the
steps it used), validating every ``expert.eval_every`` steps as the pipeline does. The seed
orders the batches and draws the LoRA's initialisation (the validation split stays the
pipeline's). It reports, per domain, how many seeds reached :data:`loramix.validation.LEARNED_LOSS`
and the step each first did; each curve lets early-stopping rules be replayed offline. Writes
``--output`` (JSON lines) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def train_one(run: str, domain: str, seed: int, overrides: list[str], early_stopping: bool = False) -> dict:
    """One expert on ``domain``, batches ordered by ``seed``; its validation curve (and with
    ``early_stopping``, the pipeline's stopping rule: patience, cooldown, going on)."""
    import torch  # lazy: the parent process only schedules

    from loramix import data, loops, stages  # lazy: the parent process only schedules
    from loramix.artifact import read_json  # lazy: the parent process only schedules
    from loramix.config import load_config  # lazy: the parent process only schedules
    from loramix.messages import BaseResult  # lazy: the parent process only schedules
    from loramix.validation import LEARNED_LOSS, Validation  # lazy: the parent process only schedules

    torch.set_num_threads(1)
    cfg = load_config(Path(run) / "config.yaml", [o if o.startswith("expert.") else f"expert.{o}" for o in overrides])
    o = cfg.expert
    base = BaseResult.from_json(read_json(Path(run) / "stages" / "base.json")["result"])  # the run's own base
    tokenizer = stages.load_tokenizer(base)
    path = next(d.train for d in cfg.data.domains if d.name == domain)
    train, val = stages.split_validation(stages.examples(cfg, tokenizer, path), o.val_fraction, cfg.seed)
    random.Random(seed).shuffle(train)

    def validation(m):
        check = Validation.of(stages.val_loss_fn(m, val, o.batch_size, tokenizer.pad_token_id), o)
        if not early_stopping:
            check.patience = 0  # the whole curve: stopping rules are replayed on it offline
        return check

    torch.manual_seed(seed)  # the LoRA's initialisation too
    batches = data.batches(train, o.batch_size, tokenizer.pad_token_id, seed=seed, steps=o.steps)
    _, summary = loops.train_expert(
        o, stages.load_base(cfg, base), batches, report=lambda m, c: None, validation=validation, log_every=10**9
    )
    curve = summary["val_losses"]
    return {
        "domain": domain,
        "seed": seed,
        "overrides": overrides,
        "learned_at": next((s for s, loss in curve if loss <= LEARNED_LOSS), None),
        "final": curve[-1][1],
        "steps": summary["steps"],
        "curve": curve,
        "seconds": summary["seconds"],
    }


def run(
    run_dir: str,
    domains: list[str],
    seeds: list[int],
    overrides: list[str],
    jobs: int = 2,
    early_stopping: bool = False,
) -> list[dict]:
    """Every (domain, seed) in its own process, ``jobs`` at a time."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

    def one(job):
        domain, seed = job
        cmd = [sys.executable, "-m", "benchmarks.expert_seeds", run_dir, "--one", domain, str(seed)]
        cmd += ["--set", *overrides] if overrides else []
        cmd += ["--early-stopping"] if early_stopping else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            raise RuntimeError(f"{domain} seed {seed} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, [(d, s) for d in domains for s in seeds]))


def table(results: list[dict]) -> str:
    lines = [
        "| domain | learned | first step under the learned loss, per seed | final loss, per seed | steps |",
        "|---|---|---|---|---|",
    ]
    for domain in dict.fromkeys(r["domain"] for r in results):
        rows = [r for r in results if r["domain"] == domain]
        steps = [r["learned_at"] for r in rows]
        learned = [s for s in steps if s is not None]
        median = f", median {statistics.median(learned):.0f}" if learned else ""
        finals = ", ".join(f"{r['final']:.3f}" for r in rows)
        firsts = ", ".join(str(s or "-") for s in steps)
        used = ", ".join(str(r.get("steps", "-")) for r in rows)
        lines.append(f"| {domain} | {len(learned)}/{len(rows)}{median} | {firsts} | {finals} | {used} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a `loramix run` output directory (its config.yaml and trained base)")
    parser.add_argument("--domains", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time (one thread each)")
    parser.add_argument("--output", help="append each result to this JSON-lines file")
    parser.add_argument("--one", nargs=2, metavar=("DOMAIN", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--set", nargs="+", default=[], dest="overrides", help="expert settings: expert.rank=16 ...")
    parser.add_argument(
        "--early-stopping", action="store_true", help="stop as the pipeline does (patience, cooldown); `steps` = used"
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(train_one(args.run_dir, args.one[0], int(args.one[1]), args.overrides, args.early_stopping)))
        return
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "stages" / "base.json").is_file():
        parser.error(f"{run_dir} is not a `loramix run` output directory with its base trained (config.yaml, stages/).")
    from loramix.config import load_config  # lazy: the --one children load the stack themselves

    known = [d.name for d in load_config(run_dir / "config.yaml").data.domains]
    domains = args.domains or known
    if set(domains) - set(known):
        parser.error(f"{run_dir} has no domain {sorted(set(domains) - set(known))}; its domains: {known}")
    results = run(args.run_dir, domains, args.seeds, args.overrides, args.jobs, args.early_stopping)
    if args.output:
        with open(args.output, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    print(table(results))


if __name__ == "__main__":
    main()
