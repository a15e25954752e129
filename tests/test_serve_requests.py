"""Request validation and Serve configuration, without Ray: every bad input gets the right
status and names its field; the generated Serve config passes Ray's own schema."""

import asyncio
import functools
from types import SimpleNamespace

import pytest

from loramix import synthetic
from loramix.config import ConfigError
from loramix.serve_config import ServeConfig
from loramix.synthetic import demo_artifact
from serve_app.app import deployment_options, load_serve_config, serve_config
from serve_app.dispatch import Dispatcher
from serve_app.schemas import APIError, ChatCompletionRequest, CompletionRequest, parse

EXPERTS = ["reverse", "sort", "shift"]


@pytest.fixture(scope="module")
def dispatcher() -> Dispatcher:
    cfg = ServeConfig(max_tokens_limit=32)
    return Dispatcher(cfg, EXPERTS, synthetic.build_tokenizer(), 64, None, None, {})


def plan(dispatcher, **body):
    body = {"model": "loramix", "prompt": "reverse abc=", **body}
    request = parse(CompletionRequest, body)
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    return dispatcher.plan(request, [dispatcher.encode(p) for p in prompts], "prompt")


def test_good_requests_plan(dispatcher):
    (p,) = plan(dispatcher)
    assert p.weights is None and p.pinned is None and p.params.max_tokens == 16
    assert p.prompt_ids == dispatcher.encode("reverse abc=") and p.prompt_ids[0] == dispatcher.tokenizer.bos_token_id
    (p,) = plan(dispatcher, model="loramix:sort", max_tokens=4, stop="x", seed=3, temperature=0)
    assert p.pinned == "sort" and p.weights == [0.0, 1.0, 0.0] and p.params.stop == ("x",)
    (p,) = plan(dispatcher, expert_weights={"reverse": 1, "shift": 3})
    assert p.weights == [0.25, 0.0, 0.75]
    assert len(plan(dispatcher, prompt=["a", "b"])) == 2


@pytest.mark.parametrize(
    "body, status, param, match",
    [
        ({"model": "gpt-4"}, 404, "model", "does not exist"),
        ({"model": "loramix:nope"}, 404, "model", "does not exist"),
        ({"expert": "nope"}, 400, "expert", "unknown `expert`"),
        ({"model": "loramix:sort", "expert": "shift"}, 400, "expert", "pick one"),
        ({"expert_weights": {"nope": 1.0}}, 400, "expert_weights", "unknown experts"),
        ({"expert_weights": {"sort": -1.0}}, 400, "expert_weights", ">= 0"),
        ({"expert_weights": {"sort": 0.0}}, 400, "expert_weights", "all zero"),
        ({"expert_weights": {"sort": float("nan")}}, 400, "expert_weights", "finite"),
        ({"expert": "sort", "expert_weights": {"sort": 1.0}}, 400, "expert_weights", "not both"),
        ({"max_tokens": 0}, 400, "max_tokens", r"\[1, 32\]"),
        ({"max_tokens": 33}, 400, "max_tokens", r"\[1, 32\]"),
        ({"n": 2}, 400, "n", "must be 1"),
        ({"prompt": ""}, 400, "prompt", "empty"),
        ({"prompt": "x" * 60}, 400, "prompt", "context length 64"),
        ({"prompt": ["a", "b"], "stream": True}, 400, "stream", "single prompt"),
        ({"prompt": 5}, 400, "prompt", "valid string"),
        ({"max_tokens": "5"}, 400, "max_tokens", "valid integer"),
        ({"temperature": 3}, 400, "temperature", "less than or equal to 2"),
        ({"stop": [1]}, 400, "stop", "valid string"),
        ({"model": None}, 400, "model", "valid string"),
        # failed inside a batch (500 for every request in it) before the ingress refused them
        ({"seed": 2**63}, 400, "seed", "less than or equal to"),
        ({"seed": -1}, 400, "seed", "greater than or equal to 0"),
        ({"temperature": 1e-30}, 400, "temperature", "0 \\(greedy\\) or at least 0.001"),
        ({"stop": ""}, 400, "stop", "must not be empty"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 strings"),
        ({"stop": "x" * 200}, 400, "stop", "at most 128 characters"),
        ({"prompt": "bad \ud800 text"}, 400, "prompt", "lone surrogate"),
        ({"model": "loramix\ud800"}, 400, "model", "lone surrogate"),
        # OpenAI parameters this server does not implement: refused unless off
        ({"logprobs": 2}, 400, "logprobs", "not supported"),
        ({"echo": True}, 400, "echo", "not supported"),
        ({"best_of": 3}, 400, "best_of", "not supported"),
        ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
        ({"tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty", "not supported"),
        ({"bogus": 1}, 400, "bogus", "unrecognized request argument"),
    ],
)
def test_bad_requests(dispatcher, body, status, param, match):
    with pytest.raises(APIError, match=match) as err:
        plan(dispatcher, **body)
    assert (err.value.status, err.value.param) == (status, param)
    payload = err.value.response().body
    assert b'"error"' in payload and param.encode() in payload


def test_missing_fields_and_non_objects():
    with pytest.raises(APIError, match="`prompt` is required") as err:
        parse(CompletionRequest, {"model": "loramix"})
    assert err.value.param == "prompt"
    with pytest.raises(APIError, match="`messages.0.content`"):
        parse(ChatCompletionRequest, {"model": "loramix", "messages": [{"role": "user"}]})
    with pytest.raises(APIError, match="JSON object"):
        parse(CompletionRequest, ["not", "an", "object"])


def test_chat_prompt_without_template_joins_contents(dispatcher):
    request = parse(ChatCompletionRequest, {"model": "loramix", "messages": [{"role": "user", "content": "sort ba="}]})
    assert dispatcher.chat_prompt(request.messages) == dispatcher.encode("sort ba=")


def test_chat_prompt_uses_the_tokenizers_template():
    tok = synthetic.build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    d = Dispatcher(ServeConfig(), EXPERTS, tok, 64, None, None, {})
    messages = parse(
        ChatCompletionRequest,
        {
            "model": "loramix",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        },
    ).messages
    want = tok("system: be brief\nuser: hi\nassistant: ", add_special_tokens=False)["input_ids"]
    assert d.chat_prompt(messages) == want


def test_deployment_options_reach_the_autoscaler():
    cfg = ServeConfig(topology="routed")
    fixed = deployment_options(cfg.fused)
    assert fixed["num_replicas"] == 1 and fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaled = deployment_options(cfg.experts.model_copy(update={"num_gpus": 1.0}))
    assert "num_replicas" not in scaled and scaled["ray_actor_options"]["num_gpus"] == 1.0
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 2


def test_serve_config_passes_rays_schema(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    art = demo_artifact(tmp_path / "artifact", router_steps=1)
    cfg = load_serve_config(art, {"topology": "routed", "api_key": "secret", "experts": {"num_gpus": 1}})
    doc = serve_config(art, cfg)
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    names = {d.name for d in app.deployments}
    assert names == {"ingress", "fused", "router", "expert-reverse", "expert-sort", "expert-shift"}
    assert "api_key" not in app.args["serve"], "secrets must not be written into the Serve config"
    assert all(d.ray_actor_options.num_gpus == 1 for d in app.deployments if d.name.startswith("expert-"))


def test_serve_config_of_a_version_pins_it_in_every_deployment(tmp_path):
    """`loramix serve-config RUN --version N`: the source stays the run (replicas find every version
    there) and each deployment's `user_config` names N, which is what `serve deploy` updates."""
    from loramix.versions import publish

    run = tmp_path / "run"
    publish(run, demo_artifact(tmp_path / "one", router_steps=1))
    publish(run, demo_artifact(tmp_path / "two", experts=("reverse", "sort"), router_steps=1))
    cfg = load_serve_config(run / "artifact", {"topology": "routed"})
    (app,) = serve_config(run, cfg, version=1)["applications"]
    assert app["args"]["artifact"] == str(run) and app["args"]["version"] == 1
    assert {d["name"] for d in app["deployments"]} >= {"expert-reverse", "expert-sort", "expert-shift"}
    assert all(d["user_config"] == {"version": 1} for d in app["deployments"])
    (app,) = serve_config(run, cfg)["applications"]  # default: the version the run's pointer names
    assert all(d["user_config"] == {"version": 2} for d in app["deployments"])
    assert "expert-shift" not in {d["name"] for d in app["deployments"]}


def test_bad_serve_settings_are_config_errors(tmp_path):
    art = demo_artifact(tmp_path / "artifact", router_steps=1)
    with pytest.raises(ConfigError, match="route_threshold"):
        load_serve_config(art, {"route_threshold": 2})
    with pytest.raises(ConfigError, match="min_replicas"):
        load_serve_config(art, {"experts": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}})


def test_detach_needs_a_cluster(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve", str(tmp_path), "--detach"]) == 2
    assert "`--detach` leaves the app on a running cluster" in capsys.readouterr().err


class _Handle:
    """Stands in for a Serve deployment handle: records what `generate`/`complete` were sent."""

    def __init__(self, route=None):
        self.sent, self._route = [], route
        self.route = SimpleNamespace(remote=self._routed)
        self.generate = SimpleNamespace(remote=self._stream)
        self.complete = SimpleNamespace(remote=self._complete)

    def options(self, **_):
        return self

    async def _routed(self, payload):
        return self._route

    async def _complete(self, payload):
        self.sent.append(payload)
        return {"text": "ok", "token_ids": [1, 2], "finish_reason": "stop", "route": None}

    async def _stream(self, payload):
        self.sent.append(payload)
        yield {"text": "o", "token_ids": [1], "finish_reason": None, "route": None}
        yield {"text": "k", "token_ids": [2], "finish_reason": "stop", "route": None}


@pytest.mark.parametrize("sequence_router", [True, False])
def test_routed_fallback_reuses_a_sequence_routers_weights(sequence_router):
    """Below `route_threshold` a routed request goes to the fused replicas; a sequence router's
    weights go with it (no second routing there); block/token routers route again there."""
    route = [0.5, 0.3, 0.2]
    fused, router, experts = _Handle(), _Handle(route=route), {n: _Handle() for n in EXPERTS}
    cfg = ServeConfig(topology="routed", route_threshold=0.6)
    d = Dispatcher(
        cfg, EXPERTS, synthetic.build_tokenizer(), 64, fused, router, experts, sequence_router=sequence_router
    )
    (p,) = plan(d)
    result = asyncio.run(d.collect(p))
    assert result["deployment"] == "fused" and not any(h.sent for h in experts.values())
    assert fused.sent[0]["expert_weights"] == (route if sequence_router else None)
    assert result["route"]["expert_weights"] == dict(zip(EXPERTS, route))
    router._route = [0.1, 0.8, 0.1]  # confident: the expert's own replicas, no weights sent
    result = asyncio.run(d.collect(p))
    assert result["deployment"] == "expert:sort" and experts["sort"].sent[0]["expert_weights"] is None


def test_a_whole_answer_is_one_call_and_streams_say_where_they_went_once():
    """Non-streaming plans take one `complete` call (no per-token messages); a stream's first chunk
    carries the route, later ones none; both end with the same answer and route."""
    fused = _Handle()
    d = Dispatcher(ServeConfig(), EXPERTS, synthetic.build_tokenizer(), 64, fused, None, {})
    (p,) = plan(d, expert_weights=dict(zip(EXPERTS, [0.0, 1.0, 0.0])))

    async def streamed():
        return [delta async for delta in d.deltas(p)]

    chunks = asyncio.run(streamed())
    assert [c["text"] for c in chunks] == ["o", "k"] and "route" not in chunks[1]
    assert chunks[0]["route"] == {
        "deployment": "fused",
        "version": None,
        "pinned": None,
        "expert_weights": dict(zip(EXPERTS, [0.0, 1.0, 0.0])),
    }
    whole = asyncio.run(d.collect(p))
    assert whole == functools.reduce(lambda r, c: d.accumulate(r, c), chunks, None)
    assert whole["completion_tokens"] == 2 and whole["deployment"] == "fused"
    assert fused.sent[0] == fused.sent[1] and fused.sent[0]["expert_weights"] == [0.0, 1.0, 0.0]


def test_off_values_of_unsupported_parameters_and_bookkeeping_pass(dispatcher):
    (p,) = plan(
        dispatcher,
        logprobs=None,
        echo=False,
        best_of=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        user="u-1",
        metadata={"k": "v"},
        logit_bias={},
    )
    assert p.params.max_tokens == 16


def test_expert_weights_whose_sum_overflows_still_normalise(dispatcher):
    (p,) = plan(dispatcher, expert_weights={"reverse": 1e308, "sort": 1e308})
    assert p.weights == [0.5, 0.5, 0.0]


def test_request_limits_refuse_before_tokenising():
    cfg = ServeConfig(max_prompts=3, max_request_tokens=40)
    d = Dispatcher(cfg, EXPERTS, synthetic.build_tokenizer(), 64, None, None, {})
    with pytest.raises(APIError, match=r"holds 250000 prompts; at most 3 \(`serve.max_prompts`\)") as err:
        d.check_prompts(250_000)
    assert err.value.status == 400
    request = parse(CompletionRequest, {"model": "loramix", "prompt": ["abc", "abd", "abe"], "max_tokens": 16})
    with pytest.raises(APIError, match="asks for 60 tokens .* at most 40 .`serve.max_request_tokens`."):
        d.plan(request, [d.encode(p) for p in request.prompt], "prompt")


def test_chat_template_refusal_is_a_400():
    tok = synthetic.build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    d = Dispatcher(ServeConfig(), EXPERTS, tok, 64, None, None, {})
    request = parse(ChatCompletionRequest, {"model": "loramix", "messages": [{"role": "system", "content": "x"}]})
    with pytest.raises(APIError, match="chat template refused `messages`: no system") as err:
        d.chat_prompt(request.messages)
    assert (err.value.status, err.value.param) == (400, "messages")


def test_blank_api_keys_are_errors_not_open_servers(monkeypatch):
    from pipelines.serve import api_key_flag

    with pytest.raises(ValueError, match="`serve.api_key` is empty or blank"):
        ServeConfig(api_key="   ")
    with pytest.raises(ConfigError, match="--api-key is empty or blank"):
        api_key_flag("")
    monkeypatch.setenv("LORAMIX_API_KEY", " ")
    with pytest.raises(ConfigError, match="LORAMIX_API_KEY is empty or blank"):
        api_key_flag(None)
    monkeypatch.setenv("LORAMIX_API_KEY", "k3y")
    assert api_key_flag(None) == "k3y" and api_key_flag("flag") == "flag"
    monkeypatch.delenv("LORAMIX_API_KEY")
    assert api_key_flag(None) is None


def test_a_replica_decodes_each_request_with_the_version_it_was_planned_for(tmp_path, monkeypatch):
    """During a rolling update a replica holds the new current version and the previous one: a
    request planned for either decodes with that version's engine (one runner, a scheduler, per
    version); an older one is dropped (its runner closed) and loaded again from its immutable
    folder if a request still asks."""
    import asyncio
    from pathlib import Path
    from types import SimpleNamespace

    from loramix.versions import publish
    from serve_app.deployments import Versions

    run = tmp_path / "run"
    for n, experts in enumerate([("reverse", "sort"), ("reverse", "shift"), ("sort", "shift")], start=1):
        assert publish(run, demo_artifact(tmp_path / f"staged{n}", experts=experts)) == n
    loads, closed = [], []

    def load(folder):
        loads.append(Path(folder).name)
        return SimpleNamespace(folder=Path(folder).name, device="cpu")

    class Runner:  # what a request gets decoded by: its engine's version
        def __init__(self, engine):
            self.engine = engine

        async def __call__(self, x: str) -> str:
            return f"{self.engine.folder}:{x}"

        def close(self):
            closed.append(self.engine.folder)

    async def scenario():
        versions = Versions(str(run / "artifact"), load, Runner)
        await versions.switch(1)
        await versions.switch(2)  # an update: v1 stays for the requests planned for it
        _, v1 = await versions.get(1)
        _, v2 = await versions.get(2)
        answers = await asyncio.gather(v1("a"), v2("b"), v1("c"))
        assert answers == ["v1:a", "v2:b", "v1:c"]
        assert (versions.current, versions.previous, sorted(versions.loaded)) == (2, 1, [1, 2])
        await versions.switch(3)
        assert sorted(versions.loaded) == [2, 3] and closed == ["v1"]  # v1 dropped, its scheduler closed
        _, v1 = await versions.get(1)  # a straggler planned for v1: loaded again, not refused
        assert await v1("d") == "v1:d"
        with pytest.raises(Exception, match="has no version 7"):
            await versions.get(7)

    asyncio.run(scenario())
    assert loads == ["v1", "v2", "v3", "v1"]


def test_an_answer_that_is_eos_at_once_is_counted_without_failing_the_request():
    """Ray's counters refuse an increment of 0: a completion with no tokens (EOS first) made the
    ingress answer 500 after decoding it (seen in the serving benchmark's sampled requests)."""
    from types import SimpleNamespace

    from ray.util.metrics import Counter, Histogram

    from serve_app.ingress import IngressDeployment

    ingress = IngressDeployment.func_or_class.__new__(IngressDeployment.func_or_class)
    tags = ("model", "expert", "target")
    for name in ("m_requests", "m_tokens", "m_prompt"):
        setattr(ingress, name, Counter(f"test_{name}", tag_keys=tags))
    ingress.m_latency = Histogram("test_latency", boundaries=[1.0], tag_keys=tags)
    plan = SimpleNamespace(model="loramix", prompt_ids=[1, 2], top_expert=lambda route: "none")
    ingress._observe(plan, {"route": None, "deployment": "fused", "completion_tokens": 0}, 0.0)


def test_deltas_that_piled_up_go_out_as_one_chunk():
    from loramix.serving import Delta
    from serve_app.deployments import _merged

    out = _merged([Delta("a", [5], route=[1.0, 0.0]), Delta("b", [6]), Delta("", [], "stop")])
    assert out == {"text": "ab", "token_ids": [5, 6], "finish_reason": "stop", "route": [1.0, 0.0], "error": None}


def test_model_replicas_get_the_decoding_settings(tmp_path):
    """`serve.max_running_requests`, `max_batched_tokens` and `cuda_graphs` reach every model
    replica's constructor (its Scheduler), in both topologies."""
    from serve_app.app import build_app

    art = demo_artifact(tmp_path / "artifact", router_steps=1)
    serve = {"topology": "routed", "max_running_requests": 5, "max_batched_tokens": 77, "cuda_graphs": False}
    ingress = build_app({"artifact": str(art), "serve": serve})._bound_deployment
    _, _, fused, router, experts = ingress.init_args
    models = [a._bound_deployment for a in (fused, *experts.values())]
    assert router._bound_deployment.name == "router"
    assert {m.name for m in models} == {"fused", "expert-reverse", "expert-sort", "expert-shift"}
    assert all(m.init_args[2:] == (5, 77, False) for m in models)
