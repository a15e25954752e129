"""The decoding step through graphs (loramix.decode_graphs): static buffers for tokens, positions,
gates and a token router's running sums, one graph per batch/length bucket. On a CPU the same path
runs with emulated replays (EMULATE_ON_CPU); benchmarks/device_check.py captures real CUDA graphs."""

import pytest
from helpers import drive
from test_serving import PROMPTS, reference

from loramix import decode_graphs
from loramix.batching import Scheduler
from loramix.decode_graphs import StepGraphs, batch_bucket, length_bucket
from loramix.serving import Engine, GenerationRequest, SamplingParams
from loramix.synthetic import demo_artifact

RECIPES = {  # modula: running context sums as state, growing (prompt) or the prompt's alone (prompt_only)
    "moa": ("moa", {}),
    "mole": ("mole", {}),
    "modula": ("modula", {"context": "prompt"}),
    "modula-prompt_only": ("modula", {"context": "prompt_only"}),
}


@pytest.fixture(scope="module", params=sorted(RECIPES))
def engine(request, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp(request.param)
    recipe, kwargs = RECIPES[request.param]
    path = demo_artifact(root / "artifact", recipe=recipe, top_k=2, router_kwargs=kwargs)
    return Engine.from_artifact(path)


@pytest.fixture
def graphs(monkeypatch):
    monkeypatch.setattr(decode_graphs, "EMULATE_ON_CPU", True)


def run_staggered(scheduler, engine):
    """Routed, pinned and mixed requests of different lengths arriving while others decode."""
    n = len(engine.expert_names)
    texts = [*PROMPTS, PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    weights = [None] * 4 + [[float(j == 0) for j in range(n)], [float(j == 1) for j in range(n)]]
    weights.append([0.5, 0.5, *[0.0] * (n - 2)])
    lengths = [10, 3, 7, 12, 5, 9, 6]
    params = [SamplingParams(max_tokens=m) for m in lengths]
    reqs = [GenerationRequest(engine.encode(t), p, w) for t, p, w in zip(texts, params, weights)]
    reqs.append(GenerationRequest(engine.encode(PROMPTS[3]), SamplingParams(max_tokens=12, temperature=1.2, seed=3)))
    out = drive(scheduler, reqs, {0: [0, 1], 1: [2, 7], 3: [3, 4], 4: [5], 9: [6]})
    return reqs, texts, [[t for d in ds for t in d.token_ids] for ds in out]


def test_graph_decoding_equals_generate_and_eager_decoding_with_staggered_arrivals(engine, graphs):
    """Every greedy row equals generate whatever shared its steps; a seeded sampled row gives the
    eager path's tokens; graphs were captured per bucket and replayed, not rebuilt every step."""
    scheduler = Scheduler(engine, max_running=6)
    reqs, texts, got = run_staggered(scheduler, engine)
    for r, text, tokens in zip(reqs[:7], texts, got):
        assert tokens == reference(engine, text, r.params.max_tokens, r.expert_weights)
    eager = run_staggered(Scheduler(engine, max_running=6, cuda_graphs=False), engine)[2]
    assert got == eager
    assert all(b.graphs is None for b in Scheduler(engine, cuda_graphs=False).batches.values())
    batches = [b for b in scheduler.batches.values() if b.graphs is not None]
    assert batches and not any(b.graphs.broken for b in batches)
    captured = {key for b in batches for key in b.graphs.graphs}
    assert 1 < len(captured) < scheduler.steps, "one graph per bucket, replayed across steps"


def test_without_emulation_a_cpu_engine_decodes_eagerly(engine):
    scheduler = Scheduler(engine)
    scheduler.complete([GenerationRequest(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=3))])
    assert all(b.graphs is None for b in scheduler.batches.values())


def test_a_capture_that_fails_falls_back_to_eager_decoding_once(engine, graphs, monkeypatch):
    calls = []

    def broken(self, *args):
        calls.append(args)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraphs, "_capture", broken)
    scheduler = Scheduler(engine, max_running=4)
    got = scheduler.complete([GenerationRequest(engine.encode(t), SamplingParams(max_tokens=6)) for t in PROMPTS])
    assert [c.token_ids for c in got] == [reference(engine, t, 6) for t in PROMPTS]
    assert len(calls) == len(scheduler.batches), "one failed capture per batch, then eager"
    assert all(b.graphs.broken for b in scheduler.batches.values())


def test_buckets():
    assert [batch_bucket(n, 32) for n in (1, 2, 3, 5, 8, 9, 17, 31)] == [1, 2, 4, 8, 8, 16, 24, 32]
    assert batch_bucket(30, 20) == 20
    assert [length_bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_a_growing_cache_drops_the_graphs_that_hold_its_old_tensors(engine, graphs):
    scheduler = Scheduler(engine, max_running=2)
    long = GenerationRequest(engine.encode(PROMPTS[0]), SamplingParams(max_tokens=40))
    (done,) = scheduler.complete([long])
    assert len(done.token_ids) == 40 or done.finish_reason == "stop"
    (batch,) = scheduler.batches.values()
    spans = {key[1] for key in batch.graphs.graphs}
    assert spans == {batch.cache.capacity} and batch.graphs.capacity == batch.cache.capacity
    assert batch.cache.capacity >= len(long.prompt_ids) + len(done.token_ids) > 32, "sanity: the cache grew"
    assert done.token_ids == reference(engine, PROMPTS[0], 40)
