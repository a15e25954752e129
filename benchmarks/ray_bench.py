"""``loramix bench --ray``: the sections that need a Ray instance (started locally if none).

4. training: the same experts trained concurrently (one TorchTrainer each, launched together)
   vs one after another; and DeepSpeed ZeRO stages 0/2/3 on one expert with two workers:
   seconds per step and peak resident memory per worker, as ratios to ZeRO-0.
5. serving: requests/s and p50/p99 latency against client concurrency, fused vs routed
   topology, on the demo world over real HTTP (routed: every prompt's router is confident,
   so requests reach the per-expert merged replicas).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from benchmarks import TINY_SYNTHETIC
from loramix import plan, stages, synthetic
from loramix.config import build_config

TASKS = ["reverse", "sort", "shift"]


def _config(root: Path, steps: int, zero_stage: int = 2, workers: int = 1):
    data = synthetic.write_demo_data(root / "data", TASKS[:2], train_size=256, eval_size=8)
    return build_config(
        {
            "output": str(root / "out"),
            "model": {"synthetic": TINY_SYNTHETIC | {"pretrain_steps": 0}},
            "data": {"max_length": 32, "domains": data["domains"]},
            "expert": {"rank": 8, "steps": steps, "batch_size": 16, "patience": 0},  # a fixed step count
            "train": {"zero_stage": zero_stage, "log_every": steps, "checkpoint_every": 10 * steps},
            "resources": {"num_workers": workers, "cpus_per_worker": 1.0 / workers},
        }
    )


def _fit(cfg, base, name: str, tag: str):
    """One expert's stage of the plan, trained as `loramix run` trains it, into ``OUTPUT/<tag>``."""
    from actors.stage_tasks import run_lora_stage  # lazy: each benchmark loads only its own stack

    cfg = cfg.model_copy(update={"output": str(Path(cfg.output) / tag)})
    ctx = plan.Context.create(cfg)
    stage = next(s for s in plan.build_plan(cfg) if s.name == f"expert/{name}")
    return run_lora_stage.remote(stage, ctx, f"{tag}-{name}", None, base)


def training(root: Path, steps: int) -> dict:
    cfg = _config(root, steps)
    base_info = stages.base_stage(cfg, root / "base")
    names = [d.name for d in cfg.data.domains]
    t = time.perf_counter()
    for name in names:
        ray.get(_fit(cfg, base_info, name, "sequential"))
    sequential = time.perf_counter() - t
    t = time.perf_counter()
    ray.get([_fit(cfg, base_info, name, "concurrent") for name in names])
    concurrent = time.perf_counter() - t
    zero = {}
    for stage in (0, 2, 3):
        cfg_z = _config(root, steps, zero_stage=stage, workers=2)
        summary = ray.get(_fit(cfg_z, base_info, names[0], f"zero{stage}"))
        zero[stage] = {
            "seconds_per_step": summary.loop_seconds_per_step,
            "peak_rss_mib": summary.peak_rss_mib,
            "peak_gpu_mib": summary.peak_gpu_mib,
        }
    for stage in (2, 3):
        zero[stage]["step_time_vs_zero0"] = zero[stage]["seconds_per_step"] / zero[0]["seconds_per_step"]
        zero[stage]["memory_vs_zero0"] = zero[stage]["peak_rss_mib"] / zero[0]["peak_rss_mib"]
    return {
        "experts": len(names),
        "steps": steps,
        "sequential_s": sequential,
        "concurrent_s": concurrent,
        "speedup_concurrent": sequential / concurrent,
        "zero": {str(k): v for k, v in zero.items()},
    }


def _load(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    import openai  # lazy: each benchmark loads only its own stack

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

    def call(job):
        start = time.perf_counter()
        client.completions.create(model=job[0], prompt=job[1], max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = sorted(pool.map(call, jobs))
    wall = time.perf_counter() - start
    return {
        "requests_per_s": len(jobs) / wall,
        "p50_ms": 1e3 * statistics.median(latencies),
        "p99_ms": 1e3 * latencies[max(0, int(0.99 * len(latencies)) - 1)],
    }


def serving(root: Path, levels=(1, 4, 16), requests: int = 64, max_tokens: int = 16) -> dict:
    from ray import serve  # lazy: each benchmark loads only its own stack

    from pipelines.serve import deploy, settings  # lazy: each benchmark loads only its own stack

    art = str(synthetic.demo_artifact(root / "artifact", experts=tuple(TASKS)))
    light = [f"{d}.num_cpus=0" for d in ("ingress", "fused", "router", "experts")]
    prompts = [f"{task} {word}=" for task in TASKS for word in ("hello", "banana", "xyz", "quartz")]
    jobs = [("loramix", prompts[i % len(prompts)]) for i in range(requests)]
    out = {}
    for topology in ("fused", "routed"):
        url = deploy(art, settings(art, light + ["route_threshold=0.5"], topology=topology, port=8311))
        _load(url, jobs[:8], 4, max_tokens)  # warm-up: replicas load lazily-compiled kernels
        out[topology] = {str(c): _load(url, jobs, c, max_tokens) for c in levels}
        serve.delete("loramix")
    serve.shutdown()
    out["routed_vs_fused_rps"] = {
        str(c): out["routed"][str(c)]["requests_per_s"] / out["fused"][str(c)]["requests_per_s"] for c in levels
    }
    return out


def run(root: Path, quick: bool) -> dict:
    started = not ray.is_initialized()
    if started:
        ray.init(
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}},
        )
    try:
        return {
            "training": training(root / "training", steps=10 if quick else 40),
            "serving": serving(root / "serving", levels=(1, 8) if quick else (1, 4, 16), requests=16 if quick else 64),
        }
    finally:
        if started:
            ray.shutdown()
