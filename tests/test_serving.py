"""The serving engine: batched decoding equals MixtureModel.generate, per-request sampling,
stop strings, lengths, routes, and merged single-expert models."""

import pytest
import torch

from loramix.serving import Engine, GenerationRequest, SamplingParams
from loramix.synthetic import demo_artifact

PROMPTS = ["reverse hello=", "sort banana=", "shift xyz=", "reverse ab="]


@pytest.fixture(scope="module", params=["moa", "mole", "modula"])
def engine(request, tmp_path_factory) -> Engine:
    path = demo_artifact(tmp_path_factory.mktemp(request.param) / "artifact", recipe=request.param, top_k=2)
    return Engine.from_artifact(path)


@pytest.fixture(scope="module")
def moa(tmp_path_factory):
    path = demo_artifact(tmp_path_factory.mktemp("moa1") / "artifact", recipe="moa", top_k=1)
    return path, Engine.from_artifact(path)


def reference(engine: Engine, text: str, max_tokens: int, weights=None) -> list[int]:
    """MixtureModel.generate on one unpadded prompt, cut at EOS."""
    ids = torch.tensor([engine.encode(text)], device=engine.device)
    w = None if weights is None else torch.tensor([weights])
    out = engine.mixture.generate(
        ids, max_new_tokens=max_tokens, expert_weights=w, pad_token_id=0, eos_token_id=engine.tokenizer.eos_token_id
    )[0, ids.shape[1] :].tolist()
    eos = engine.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


def greedy(engine, text, max_tokens=10, weights=None):
    return GenerationRequest(engine.encode(text), SamplingParams(max_tokens=max_tokens), weights)


def test_batched_greedy_equals_generate_per_prompt(engine):
    got = engine.complete([greedy(engine, t) for t in PROMPTS])
    for text, completion in zip(PROMPTS, got):
        assert completion.token_ids == reference(engine, text, 10)
        assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert completion.prompt_tokens == len(engine.encode(text))
        assert completion.route is not None and sum(completion.route) == pytest.approx(1.0, abs=1e-5)


def test_mixed_batch_of_routed_and_weighted_requests(engine):
    n = len(engine.expert_names)
    onehots = [[float(i == j) for j in range(n)] for i in range(n)]
    requests = [greedy(engine, PROMPTS[0])] + [greedy(engine, PROMPTS[1], weights=w) for w in onehots]
    got = engine.complete(requests)
    assert got[0].token_ids == reference(engine, PROMPTS[0], 10)
    per_expert = [c.token_ids for c in got[1:]]
    for w, tokens in zip(onehots, per_expert):
        assert tokens == reference(engine, PROMPTS[1], 10, w)
    assert len({tuple(t) for t in per_expert}) > 1, "sanity: experts must answer differently"
    assert [c.route for c in got[1:]] == onehots


def test_merged_expert_equals_pinned_mixture(moa):
    path, mixture = moa
    name = mixture.expert_names[1]
    merged = Engine.from_artifact(path, expert=name)
    assert merged.mixture is None and merged.expert_names == []
    w = [float(n == name) for n in mixture.expert_names]
    want = mixture.complete([greedy(mixture, t, weights=w) for t in PROMPTS])
    got = merged.complete([greedy(merged, t) for t in PROMPTS])
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert got[0].route is None


def test_seeded_sampling_is_repeatable_in_any_batch(moa):
    _, e = moa
    hot = SamplingParams(max_tokens=12, temperature=1.5, seed=7)
    alone = e.complete([GenerationRequest(e.encode(PROMPTS[0]), hot)])[0]
    crowd = e.complete([greedy(e, PROMPTS[1]), GenerationRequest(e.encode(PROMPTS[0]), hot), greedy(e, PROMPTS[2])])
    assert crowd[1].token_ids == alone.token_ids
    other = e.complete([GenerationRequest(e.encode(PROMPTS[0]), SamplingParams(12, 1.5, seed=8))])[0]
    assert other.token_ids != alone.token_ids
    assert crowd[0].token_ids == reference(e, PROMPTS[1], 10)  # greedy rows unaffected by sampled ones


def test_tiny_top_p_is_greedy(moa):
    _, e = moa
    got = e.complete([GenerationRequest(e.encode(PROMPTS[0]), SamplingParams(10, temperature=1.0, top_p=1e-6))])
    assert got[0].token_ids == reference(e, PROMPTS[0], 10)


def test_stop_string_truncates_and_is_never_streamed(moa):
    _, e = moa
    full = e.complete([greedy(e, PROMPTS[1], 12)])[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    request = GenerationRequest(e.encode(PROMPTS[1]), SamplingParams(max_tokens=12, stop=(stop,)))
    deltas = [step[0] for step in e.stream([request]) if step[0] is not None]
    streamed = "".join(d.text for d in deltas)
    assert streamed == full.text[: full.text.index(stop)]
    assert deltas[-1].finish_reason == "stop" and all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[0].route is not None and all(d.route is None for d in deltas[1:])


def test_length_limit_and_per_request_lengths(moa):
    _, e = moa
    got = e.complete([greedy(e, PROMPTS[0], 3), greedy(e, PROMPTS[1], 7)])
    for c, text, n in zip(got, PROMPTS, (3, 7)):
        assert c.token_ids == reference(e, text, n)
        assert c.finish_reason == ("length" if len(c.token_ids) == n else "stop")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda e: GenerationRequest([], SamplingParams()), "prompt is empty"),
        (lambda e: GenerationRequest([1] * 200, SamplingParams(max_tokens=8)), "context length 128"),
        (lambda e: GenerationRequest([1, 5], SamplingParams(), [1.0]), "expert_weights"),
    ],
)
def test_bad_requests_name_the_problem(moa, make, match):
    _, e = moa
    (c,) = e.complete([make(e)])
    assert c.finish_reason == "error" and c.token_ids == [] and match in c.error


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_expert_for_merged_engine(moa):
    path, _ = moa
    with pytest.raises(ValueError, match="unknown expert 'nope'"):
        Engine.from_artifact(path, expert="nope")


def test_reported_route_equals_the_route_of_the_prompt_alone(engine, monkeypatch):
    """Every recipe reports the route `route` gives each prompt alone; MoLE/MoDULA read it off the
    decode's own prompt forward (no second forward just to report it)."""
    want = [engine.route([engine.encode(t)])[0] for t in PROMPTS]
    if engine.mixture.router.granularity != "sequence":
        monkeypatch.setattr(Engine, "route", lambda *a: pytest.fail("a separate routing forward ran"))
    got = engine.complete([greedy(engine, t) for t in PROMPTS])
    for completion, route in zip(got, want):
        assert completion.route == pytest.approx(route, abs=1e-5)


def test_bf16_fused_engine_holds_experts_in_bf16_with_the_same_tokens(tmp_path):
    """Serving a bf16 base keeps one bf16 copy of the experts (they compute in bf16 anyway):
    a third of the float32-plus-cast memory, token for token what the uncast mixture decodes."""
    from loramix.model import MixtureModel

    path = demo_artifact(tmp_path / "artifact", router_steps=5)
    engine = Engine.from_artifact(path, dtype=torch.bfloat16)
    layers = list(engine.mixture.layers.values())
    assert all(layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16 for layer in layers)
    uncast = Engine(MixtureModel.from_pretrained(path, dtype=torch.bfloat16), engine.tokenizer)
    assert next(iter(uncast.mixture.layers.values())).lora_A.dtype == torch.float32
    requests = [greedy(engine, t) for t in PROMPTS]
    assert [c.token_ids for c in engine.complete(requests)] == [c.token_ids for c in uncast.complete(requests)]
    assert all(not layer._casts for layer in layers), "no cached casts: the experts are already bf16"
    assert any(layer._casts for layer in uncast.mixture.layers.values())


def test_one_bad_request_does_not_fail_its_batch(moa):
    """A request the engine cannot decode (wrong weights, an unbuildable request) finishes alone
    with `error`; the rest of its batch decodes as if it were not there."""
    _, eng = moa
    bad_weights = GenerationRequest(eng.encode("sort ab="), SamplingParams(max_tokens=4), [1.0])  # 1 of 3 experts
    good = [greedy(eng, "reverse hello=", 6), greedy(eng, "shift xyz=", 6)]
    out = eng.complete([good[0], bad_weights, ValueError("bad request payload: seed"), good[1]])
    assert [c.finish_reason for c in out][1:3] == ["error", "error"]
    assert "expert_weights" in out[1].error and "seed" in out[2].error
    for c, text in zip((out[0], out[3]), ("reverse hello=", "shift xyz=")):
        assert c.error is None and c.token_ids == reference(eng, text, 6)


def test_sampling_at_a_temperature_that_overflows_falls_back_to_greedy(moa):
    _, eng = moa
    hot = GenerationRequest(eng.encode("reverse hello="), SamplingParams(max_tokens=6, temperature=1e-30, seed=1))
    assert eng.complete([hot])[0].token_ids == reference(eng, "reverse hello=", 6)


def test_a_cancelled_request_stops_and_its_batch_ends_with_the_others(moa):
    """A client that went away (`cancel` set) gets nothing more, and the batch does not decode on
    for it: with the long request cancelled, the batch ends when the short one is done."""
    import threading

    _, e = moa
    cancel = threading.Event()
    pinned = [1.0] + [0.0] * (len(e.expert_names) - 1)
    short = GenerationRequest(e.encode(PROMPTS[0]), SamplingParams(max_tokens=3), pinned)
    long = GenerationRequest(
        e.encode(PROMPTS[1]), SamplingParams(max_tokens=40, temperature=1.0, seed=0), pinned, cancel
    )
    steps = []
    for step in e.stream([short, long]):
        steps.append(step)
        cancel.set()  # the client of the long request disconnects after its first token
    assert len(steps) <= 3  # the short request's tokens; the long one's 40 never ran
    assert steps[0][1] is not None and all(step[1] is None for step in steps[1:])
    alone = e.complete([GenerationRequest(short.prompt_ids, short.params, short.expert_weights)])[0]
    assert "".join(step[0].text for step in steps if step[0]) == alone.text
