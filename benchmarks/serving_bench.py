"""``loramix bench --serving``: the serving engine alone (no HTTP), continuous batching against
the static batching it replaced, on one arrival trace in the same process.

Open loop: requests arrive as a Poisson process whatever the engine's pace (as users do), half
short greedy completions (``max_tokens`` 8), half long sampled ones (64, temperature 1), over
every expert: routed by the prompt's cue, pinned to one expert, or an explicit two-expert mix.

- ``static``: what ``@serve.batch`` did: take up to ``max_batch_size`` arrived requests (waiting
  ``batch_wait_timeout_s`` to fill), decode the batch to its longest request, then the next;
- ``continuous``: :class:`loramix.batching.Scheduler`: a request joins at the next step and
  leaves the step it finishes.

Reported per mode: completion tokens/s, latency p50/p99 (all, and the short requests alone),
time to first token p50/p99; ratios continuous/static. Greedy answers must match between modes.

``--http`` (:func:`http_mix`) measures the same mix end to end instead: a fused endpoint on a local
Ray, the official ``openai`` client, closed-loop clients (1, then 32): tokens/s against one
client's, and the short requests' latency against theirs when alone.
"""

from __future__ import annotations

import random
import statistics
import string
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loramix.serving import Delta, Engine, GenerationRequest, SamplingParams
from loramix.synthetic import demo_artifact


@dataclass
class Job:
    arrival: float  # seconds after the trace starts
    request: GenerationRequest
    short: bool


@dataclass
class Record:
    first: float | None = None
    end: float | None = None
    tokens: list[int] = field(default_factory=list)

    def take(self, delta: Delta, now: float) -> None:
        if self.first is None:
            self.first = now
        self.tokens += delta.token_ids
        if delta.finish_reason is not None:
            self.end = now


def workload(engine: Engine, n: int, rate: float, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    names, jobs, t = engine.expert_names, [], 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
        short = i % 2 == 0
        params = SamplingParams(max_tokens=8) if short else SamplingParams(max_tokens=64, temperature=1.0, seed=i)
        kind = i % 3
        weights = None  # routed by the cue word
        if kind == 1:  # pinned to one expert
            weights = [float(j == i % len(names)) for j in range(len(names))]
        elif kind == 2:  # an explicit mix of two
            weights = [0.5 if j in (i % len(names), (i + 1) % len(names)) else 0.0 for j in range(len(names))]
        prompt = engine.encode(f"{names[i % len(names)]} {word}=")
        jobs.append(Job(t, GenerationRequest(prompt, params, weights), short))
    return jobs


def _arrived(jobs, i: int, now: float) -> int:
    while i < len(jobs) and jobs[i].arrival <= now:
        i += 1
    return i


def run_continuous(engine: Engine, jobs: list[Job], max_running: int, max_batched_tokens: int) -> list[Record]:
    from loramix.batching import Scheduler  # lazy: the HTTP mix also runs against builds without it

    scheduler = Scheduler(engine, max_running=max_running, max_batched_tokens=max_batched_tokens)
    records = [Record() for _ in jobs]
    t0, i = time.perf_counter(), 0
    while i < len(jobs) or not scheduler.idle():
        now = time.perf_counter() - t0
        j = _arrived(jobs, i, now)
        for k in range(i, j):
            scheduler.submit(jobs[k].request, lambda d, r=records[k]: r.take(d, time.perf_counter() - t0))
        i = j
        if scheduler.idle():
            time.sleep(max(0.0, jobs[i].arrival - now))
            continue
        scheduler.step()
    return records


def run_static(engine: Engine, jobs: list[Job], max_batch_size: int, batch_wait_timeout_s: float) -> list[Record]:
    records = [Record() for _ in jobs]
    t0, i, queue = time.perf_counter(), 0, []
    while i < len(jobs) or queue:
        now = time.perf_counter() - t0
        j = _arrived(jobs, i, now)
        queue += range(i, j)
        i = j
        if not queue:
            time.sleep(max(0.0, jobs[i].arrival - now))
            continue
        if len(queue) < max_batch_size and i < len(jobs):  # wait a moment to fill the batch
            time.sleep(batch_wait_timeout_s)
            j = _arrived(jobs, i, time.perf_counter() - t0)
            queue += range(i, j)
            i = j
        batch, queue = queue[:max_batch_size], queue[max_batch_size:]
        for step in engine.stream([jobs[k].request for k in batch]):
            now = time.perf_counter() - t0
            for k, delta in zip(batch, step):
                if delta is not None:
                    records[k].take(delta, now)
    return records


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def metrics(jobs: list[Job], records: list[Record]) -> dict:
    latency = [r.end - j.arrival for j, r in zip(jobs, records)]
    short = [r.end - j.arrival for j, r in zip(jobs, records) if j.short]
    ttft = [r.first - j.arrival for j, r in zip(jobs, records)]
    tokens = sum(len(r.tokens) for r in records)
    span = max(r.end for r in records) - jobs[0].arrival
    return {
        "tokens_per_s": tokens / span,
        "completion_tokens": tokens,
        "latency_p50_s": _pct(latency, 50),
        "latency_p99_s": _pct(latency, 99),
        "short_latency_p50_s": _pct(short, 50),
        "short_latency_p99_s": _pct(short, 99),
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
    }


def run(
    *,
    requests: int = 160,
    rate: float = 12.0,
    experts: int = 4,
    hidden_size: int = 128,
    num_layers: int = 4,
    max_running: int = 32,
    max_batched_tokens: int = 2048,
    max_batch_size: int = 16,
    batch_wait_timeout_s: float = 0.01,
    seed: int = 0,
) -> dict:
    """Both modes on one trace (static first, then continuous), the demo-sized model by default."""
    names = ("reverse", "sort", "shift", "rotate", "swap")[:experts]
    with tempfile.TemporaryDirectory() as tmp:
        path = demo_artifact(
            Path(tmp) / "artifact", experts=names, top_k=1, hidden_size=hidden_size, num_layers=num_layers
        )
        engine = Engine.from_artifact(path)
        jobs = workload(engine, requests, rate, seed)
        engine.complete([jobs[0].request, jobs[1].request])  # warm-up
        static = run_static(engine, jobs, max_batch_size, batch_wait_timeout_s)
        continuous = run_continuous(engine, jobs, max_running, max_batched_tokens)
    greedy = [k for k, j in enumerate(jobs) if j.request.params.temperature == 0]
    s, c = metrics(jobs, static), metrics(jobs, continuous)
    return {
        "config": {
            "requests": requests,
            "rate_per_s": rate,
            "experts": experts,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "max_running_requests": max_running,
            "max_batched_tokens": max_batched_tokens,
            "static_max_batch_size": max_batch_size,
            "torch_threads": torch.get_num_threads(),
        },
        "static": s,
        "continuous": c,
        "throughput_ratio": c["tokens_per_s"] / s["tokens_per_s"],
        "p99_ratio": c["latency_p99_s"] / s["latency_p99_s"],
        "short_p99_ratio": c["short_latency_p99_s"] / s["short_latency_p99_s"],
        "greedy_outputs_match": all(static[k].tokens == continuous[k].tokens for k in greedy),
    }


def summary(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"serving engine, {cfg['requests']} requests arriving at {cfg['rate_per_s']:g}/s (open loop), "
        f"{cfg['experts']} experts, hidden {cfg['hidden_size']} x {cfg['num_layers']} layers, "
        f"{cfg['torch_threads']} threads",
        "| mode | tokens/s | p50 s | p99 s | short p50 s | short p99 s | TTFT p50 s | TTFT p99 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("static", "continuous"):
        m = result[mode]
        lines.append(
            f"| {mode} | {m['tokens_per_s']:.0f} | {m['latency_p50_s']:.2f} | {m['latency_p99_s']:.2f} | "
            f"{m['short_latency_p50_s']:.2f} | {m['short_latency_p99_s']:.2f} | {m['ttft_p50_s']:.3f} | "
            f"{m['ttft_p99_s']:.3f} |"
        )
    lines.append(
        f"continuous/static: throughput {result['throughput_ratio']:.2f}x, p99 {result['p99_ratio']:.2f}x, "
        f"short p99 {result['short_p99_ratio']:.2f}x; greedy answers match: {result['greedy_outputs_match']}"
    )
    return "\n".join(lines)


def _mix_jobs(names: list[str], n: int, seed: int = 0) -> list[dict]:
    """The HTTP mix: alternating short greedy (8 tokens) and long sampled (64, temperature 1) completions."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8)))
        short = i % 2 == 0
        body = {"prompt": f"{names[i % len(names)]} {word}=", "max_tokens": 8 if short else 64}
        body |= {"temperature": 0.0} if short else {"temperature": 1.0, "seed": i}
        jobs.append({"short": short, "body": body})
    return jobs


def _closed_loop(client, jobs: list[dict], clients: int) -> dict:
    def call(job):
        start = time.perf_counter()
        out = client.completions.create(model="loramix", **job["body"])
        return job["short"], time.perf_counter() - start, out.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(call, jobs))
    wall = time.perf_counter() - start
    short = [t for s, t, _ in done if s]
    return {
        "clients": clients,
        "requests": len(jobs),
        "tokens_per_s": sum(n for _, _, n in done) / wall,
        "short_latency_p50_s": _pct(short, 50),
        "short_latency_p99_s": _pct(short, 99),
    }


def http_mix(artifact: str | None = None, *, levels=(1, 32), per_client: int = 6, port: int = 8313) -> dict:
    """Closed-loop clients over real HTTP on a fused endpoint (started on a local Ray, or the one
    this process is connected to); ``artifact``: a saved mixture (default: a demo-sized one)."""
    import openai  # lazy: only the HTTP benchmark needs the client, Ray and Serve
    import ray  # lazy: only the HTTP benchmark needs the client, Ray and Serve
    from ray import serve  # lazy: only the HTTP benchmark needs the client, Ray and Serve

    from pipelines.serve import deploy, settings  # lazy: only the HTTP benchmark needs the client, Ray and Serve

    with tempfile.TemporaryDirectory() as tmp:
        if artifact is None:
            names = ("reverse", "sort", "shift", "rotate")
            artifact = str(demo_artifact(Path(tmp) / "artifact", experts=names, hidden_size=128, num_layers=4))
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
        light = [f"{d}.num_cpus=0" for d in ("ingress", "fused", "router", "experts")]
        url = deploy(artifact, settings(artifact, light, topology="fused", port=port))
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        names = [m.id.split(":", 1)[1] for m in client.models.list().data if ":" in m.id]
        _closed_loop(client, _mix_jobs(names, 8), 4)  # warm-up
        out = {str(c): _closed_loop(client, _mix_jobs(names, max(16, per_client * c), seed=c), c) for c in levels}
        serve.delete("loramix")
    one, many = out[str(levels[0])], out[str(levels[-1])]
    out["tokens_per_s_ratio"] = many["tokens_per_s"] / one["tokens_per_s"]
    out["short_p99_vs_alone"] = many["short_latency_p99_s"] / one["short_latency_p50_s"]
    return out


def http_summary(result: dict) -> str:
    levels = [k for k in result if k.isdigit()]
    lines = ["| clients | tokens/s | short p50 s | short p99 s |", "|---|---|---|---|"]
    for k in levels:
        m = result[k]
        lines.append(
            f"| {k} | {m['tokens_per_s']:.0f} | {m['short_latency_p50_s']:.2f} | {m['short_latency_p99_s']:.2f} |"
        )
    lines.append(
        f"{levels[-1]} clients vs 1: tokens/s {result['tokens_per_s_ratio']:.2f}x; short p99 "
        f"{result['short_p99_vs_alone']:.2f}x their latency alone"
    )
    return "\n".join(lines)
