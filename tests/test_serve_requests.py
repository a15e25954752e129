"""Request validation and Serve configuration, without Ray: every bad input gets the right
status and names its field; the generated Serve config passes Ray's own schema."""

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
    """Stands in for a Serve deployment handle: records what `route`/`generate` were sent."""

    def __init__(self, route=None):
        self.sent, self._route = [], route
        self.route = self.generate = self

    def options(self, **_):
        return self

    def remote(self, payload):
        if self._route is not None:

            async def route():
                return self._route

            return route()
        self.sent.append(payload)

        async def stream():
            yield {"text": "ok", "token_ids": [1], "finish_reason": "stop", "route": None}

        return stream()


@pytest.mark.parametrize("sequence_router", [True, False])
def test_routed_fallback_reuses_a_sequence_routers_weights(sequence_router):
    """Below `route_threshold` a routed request goes to the fused replicas; a sequence router's
    weights go with it (no second routing there); block/token routers route again there."""
    import asyncio

    route = [0.5, 0.3, 0.2]
    fused, router, experts = _Handle(), _Handle(route=route), {n: _Handle() for n in EXPERTS}
    cfg = ServeConfig(topology="routed", route_threshold=0.6)
    d = Dispatcher(cfg, EXPERTS, synthetic.build_tokenizer(), 64, fused, router, experts,
                   sequence_router=sequence_router)  # fmt: skip
    (p,) = plan(d)
    result = asyncio.run(d.collect(p))
    assert result["deployment"] == "fused" and not any(h.sent for h in experts.values())
    assert fused.sent[0]["expert_weights"] == (route if sequence_router else None)
    assert result["route"]["expert_weights"] == dict(zip(EXPERTS, route))
    router._route = [0.1, 0.8, 0.1]  # confident: the expert's own replicas, no weights sent
    result = asyncio.run(d.collect(p))
    assert result["deployment"] == "expert:sort" and experts["sort"].sent[0]["expert_weights"] is None
