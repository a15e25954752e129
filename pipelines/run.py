"""``loramix run``: the pipeline as a Ray task DAG, cached per stage by input hash.

    base ──> [universal] ──> expert/<d> (one TorchTrainer each, all at once) ──┐
      └────────────────────> multitask_lora (baseline, N x expert.steps) ──────┼─> router ─> eval/<method> ∥ ─> report
                                                                               └──────────────────────────────┘
Settings that change behaviour (all in :class:`loramix.config.LoramixConfig`):

- ``recipe`` / ``router.*``: which router and how it trains; ``router.top_k`` experts per route.
- ``expert.*``: rank, alpha, targets and optimiser of every domain LoRA (and the multitask LoRA,
  which gets ``N x expert.steps`` so both arms spend the same budget).
- ``universal.enabled`` (MoDULA): a universal LoRA first; domain experts train on top of it.
- ``train.zero_stage``: DeepSpeed ZeRO stage 0-3 of every LoRA trainer; ``train.checkpoint_every``:
  steps between resumable checkpoints; ``train.max_failures``: worker failures retried;
  ``train.storage_path``: where Ray Train keeps checkpoints (shared path or cloud URI).
- ``resources.*``: workers per trainer, GPUs, CPUs per worker.

A stage is skipped when ``OUTPUT/stages/<stage>.json`` holds the hash of its current inputs
(config slice + data file contents + upstream hashes), so changing one domain's data retrains
that expert, the multitask baseline, the router and eval, and nothing else.
"""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import ray

from actors.progress import ProgressActor
from loramix import stages
from loramix.artifact import StageStore, file_digest, fingerprint
from loramix.config import LoramixConfig, dump_config
from loramix.demo import ensure_demo_data
from loramix.report import write_report
from loramix.serve_config import save_serve_config
from pipelines.progress import wait_with_bars
from pipelines.train import fit_lora

logger = logging.getLogger(__name__)


def connect(address: str | None = None) -> None:
    """``--address``, else ``RAY_ADDRESS``, else a new local instance."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # No runtime_env here: inside `ray job submit` it would clash with the job's own.
    ray.init(address=address, log_to_driver=False)


def _resources(cfg: LoramixConfig) -> dict:
    return {"num_cpus": 1, "num_gpus": 1 if cfg.resources.use_gpu else 0}


def _poster(progress, job: str, total: int, every: int = 5):
    """A ``report`` callback that posts every few steps to the ProgressActor (for the driver's bars)."""

    def report(metrics: dict, ckpt=None) -> None:
        if metrics["step"] % every == 0 or metrics["step"] == total:
            progress.update.remote(job, metrics["step"], total, metrics["loss"])

    return report


# Input hashes of the LoRA stages, shared with `loramix tune`'s expert cache so a search and a
# run agree on when two experts are the same.
def base_digest(cfg: LoramixConfig) -> str:
    return fingerprint("base", cfg.model, cfg.seed, cfg.data.max_length)


def universal_digest(cfg: LoramixConfig, h_base: str, train_digests: list[str]) -> str:
    """``train_digests``: every domain's train file digest, in config order."""
    return fingerprint("universal", h_base, cfg.universal, cfg.expert.target_modules, train_digests)


def expert_digest(cfg: LoramixConfig, h_base: str, h_uni: str | None, train_digest: str) -> str:
    return fingerprint("expert", h_base, h_uni, cfg.expert, cfg.seed, train_digest)


@ray.remote
def base_stage(cfg_dict: dict, out_dir: str, store_root: str, digest: str, progress) -> dict:
    cfg = LoramixConfig.model_validate(cfg_dict)
    t0 = time.perf_counter()
    info = stages.prepare_base(cfg, out_dir, _poster(progress, "base", cfg.model.synthetic.pretrain_steps))
    result = info | {"seconds": time.perf_counter() - t0}
    StageStore(store_root).mark("base", digest, result)
    return result


@ray.remote(num_cpus=0)
def lora_stage(
    job: str,
    digest: str,
    store_root: str,
    cfg_dict: dict,
    base_info: dict,
    domains: list[str],
    after: dict | None = None,
    **kwargs,
) -> dict:
    """Tokenise this job's rows, fit its TorchTrainer and mark the stage done.

    Runs on 0 CPUs: it only waits on the trainer, whose workers hold the resources. ``after``
    is an upstream result (the universal LoRA) passed only to order the DAG.
    """
    cfg = LoramixConfig.model_validate(cfg_dict)
    tokenizer = stages.load_tokenizer(base_info)
    train = stages.domain_examples(cfg, tokenizer, "train", domains)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for d in domains for e in train[d]]
    # A global shuffle here, once: Ray Data only shuffles within a local buffer, and file order
    # (one domain after another) made the multitask LoRA oscillate between domains.
    random.Random(cfg.seed).shuffle(rows)
    t0 = time.perf_counter()
    summary = fit_lora(job, cfg_dict, base_info=base_info, rows=rows, **kwargs)
    # `seconds` stays the trainer's own time; `wall_seconds` includes waiting for resources.
    result = summary | {"wall_seconds": time.perf_counter() - t0, "path": kwargs["out_dir"]}
    StageStore(store_root).mark(job, digest, result)
    return result


@ray.remote
def router_stage(
    cfg_dict: dict,
    base_info: dict,
    experts: dict,
    universal: dict | None,
    out_dir: str,
    store_root: str,
    digest: str,
    progress,
) -> dict:
    cfg = LoramixConfig.model_validate(cfg_dict)
    t0 = time.perf_counter()
    adapters = {name: r["path"] for name, r in experts.items()}
    summary = stages.train_router_stage(
        cfg,
        base_info,
        adapters,
        out_dir,
        _poster(progress, "router", cfg.router.steps),
        universal=universal and universal["path"],
    )
    result = summary | {
        "seconds": time.perf_counter() - t0,
        "path": out_dir,
        "zero_stage": None,
        "num_workers": 1,
        "node_ids": [ray.get_runtime_context().get_node_id()],
    }
    StageStore(store_root).mark("router", digest, result)
    return result


@ray.remote
def eval_stage(
    method: str,
    cfg_dict: dict,
    base_info: dict,
    experts: dict,
    router: dict,
    multitask: dict,
    universal: dict | None,
    store_root: str,
    digest: str,
) -> dict:
    cfg = LoramixConfig.model_validate(cfg_dict)
    t0 = time.perf_counter()
    adapters = {name: r["path"] for name, r in experts.items()}
    result = stages.evaluate_method(
        method,
        cfg,
        base_info,
        adapters,
        artifact=router["path"],
        multitask=multitask["path"],
        universal=universal and universal["path"],
    )
    result["seconds"] = time.perf_counter() - t0
    StageStore(store_root).mark(f"eval/{method}", digest, result)
    return result


class Pipeline:
    """Builds the DAG for one config, reusing every stage whose input hash is unchanged."""

    def __init__(self, cfg: LoramixConfig, output: str | Path):
        self.cfg = cfg.model_copy(update={"output": str(Path(output).resolve())})
        self.out = Path(self.cfg.output)
        self.store = StageStore(self.out)
        self.cfg_dict = self.cfg.model_dump(mode="json")
        self.cached: list[str] = []
        self.progress = ProgressActor.remote()

    def _stage(self, name: str, digest: str, launch):
        done = self.store.done(name, digest)
        if done is not None:
            self.cached.append(name)
            return done
        return launch()

    def build(self) -> dict:
        cfg, out, root = self.cfg, self.out, str(self.out)
        data = {d.name: (file_digest(d.train), file_digest(d.eval)) for d in cfg.data.domains}
        h_base = base_digest(cfg)
        base = self._stage(
            "base",
            h_base,
            lambda: base_stage.options(**_resources(cfg)).remote(
                self.cfg_dict, str(out / "base"), root, h_base, self.progress
            ),
        )
        names = list(data)

        def lora(job, domains, optim, out_dir, digest, universal=None, after=None):
            return self._stage(
                job,
                digest,
                lambda: lora_stage.remote(
                    job,
                    digest,
                    root,
                    self.cfg_dict,
                    base,
                    domains,
                    after,
                    optim=optim.model_dump(mode="json"),
                    out_dir=out_dir,
                    run_name=f"{job.replace('/', '-')}-{digest}",
                    universal=universal,
                    progress=self.progress,
                ),
            )

        # Launched first: it is the longest job (N x expert.steps) and overlaps every expert.
        h_multi = fingerprint("multitask", h_base, cfg.expert, cfg.seed, [data[n][0] for n in names])
        multi_optim = stages.multitask_optim(cfg)
        multitask = lora("multitask_lora", names, multi_optim, str(out / "multitask_lora"), h_multi)
        universal, h_uni = None, None
        if cfg.universal.enabled:
            h_uni = universal_digest(cfg, h_base, [data[n][0] for n in names])
            uni_optim = stages.universal_optim(cfg)
            universal = lora("universal", names, uni_optim, str(out / "universal"), h_uni)
        experts, h_experts = {}, {}
        for name in names:
            h_experts[name] = expert_digest(cfg, h_base, h_uni, data[name][0])
            uni_path = None if universal is None else str(out / "universal")
            experts[name] = lora(
                f"expert/{name}",
                [name],
                cfg.expert,
                str(out / "experts" / name),
                h_experts[name],
                universal=uni_path,
                after=universal,
            )
        h_router = fingerprint(
            "router", h_experts, h_uni, cfg.recipe, cfg.router, cfg.universal.variant, [data[n][0] for n in names]
        )
        experts_ref = _gather(experts)
        router = self._stage(
            "router",
            h_router,
            lambda: router_stage.options(**_resources(cfg)).remote(
                self.cfg_dict, base, experts_ref, universal, str(out / "artifact"), root, h_router, self.progress
            ),
        )
        evals = {}
        for method in stages.METHODS:
            # Only the mixture's score depends on the router; the baselines keep theirs across recipes.
            upstream = {"mixture": h_router, "multitask_lora": h_multi, "base": h_base}.get(method, h_experts)
            h_eval = fingerprint(
                "eval", method, upstream, cfg.data.eval_limit, cfg.data.max_length, [data[n][1] for n in names],
                # Scores of runs with a universal LoRA now keep it under the oracle and merges.
                *(("universal-under-experts", h_uni) if h_uni else ()),
            )  # fmt: skip
            evals[f"eval/{method}"] = self._stage(
                f"eval/{method}",
                h_eval,
                lambda m=method, h=h_eval: eval_stage.options(**_resources(cfg)).remote(
                    m, self.cfg_dict, base, experts_ref, router, multitask, universal, root, h
                ),
            )
        return {
            "base": base,
            "universal": universal,
            **{f"expert/{n}": r for n, r in experts.items()},
            "multitask_lora": multitask,
            "router": router,
            **evals,
        }

    def run(self) -> dict:
        """Run (or reuse) every stage, then write ``report.json``/``report.md``/plots and return the report."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(dump_config(self.cfg))
        t0 = time.perf_counter()
        nodes = {k: v for k, v in self.build().items() if v is not None}
        results = wait_with_bars({k: v for k, v in nodes.items() if isinstance(v, ray.ObjectRef)}, self.progress)
        results |= {k: v for k, v in nodes.items() if not isinstance(v, ray.ObjectRef)}
        return self.report(results, time.perf_counter() - t0)

    def report(self, results: dict, total: float) -> dict:
        training = {
            k: {
                f: v.get(f)
                for f in ("zero_stage", "num_workers", "steps", "final_loss", "seconds", "node_ids", "losses")
            }
            for k, v in results.items()
            if k.startswith(("expert/", "universal", "multitask", "router"))
        }
        timings = {
            k: (0.0 if k in self.cached else v.get("wall_seconds", v.get("seconds", 0.0))) for k, v in results.items()
        } | {"total": total}
        methods = {
            m: {f: v[f] for f in ("per_domain", "avg", "error") if f in v}
            for m in stages.METHODS
            if (v := results.get(f"eval/{m}")) is not None
        }
        router = results["eval/mixture"].get("router", {})
        save_serve_config(self.cfg.serve, self.out / "artifact")
        return write_report(
            self.out,
            self.cfg,
            methods=methods,
            router=router,
            training=training,
            timings=timings,
            extra={"cached_stages": sorted(self.cached)},
        )


@ray.remote(num_cpus=0)
def _collect(**results):
    return results


def _gather(named: dict):
    """One ref resolving to ``{name: result}`` (Ray resolves top-level ref arguments only)."""
    if all(not isinstance(v, ray.ObjectRef) for v in named.values()):
        return named
    return _collect.remote(**named)


def run_pipeline(cfg: LoramixConfig, output: str | Path | None = None, address: str | None = None) -> dict:
    """Run the whole pipeline on Ray and return the report (see module docstring)."""
    ensure_demo_data(cfg)
    for d in cfg.data.domains:  # fail before starting Ray, naming the domain
        for split in ("train", "eval"):
            path = getattr(d, split)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"domain {d.name!r}: {split} data {path!r} does not exist.")
    connect(address)
    return Pipeline(cfg, output or cfg.output).run()
