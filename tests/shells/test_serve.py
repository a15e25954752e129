"""The Serve app over real HTTP on a real local Ray: the official `openai` client, both
topologies, every bad input, the API key, and a bounded load test."""

import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch

from loramix.serving import Engine
from loramix.synthetic import demo_artifact

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERTS = ["reverse", "sort", "shift"]
PROMPTS = {"reverse": "reverse hello=", "sort": "sort banana=", "shift": "shift xyz="}
# 2 CPUs in tests: replicas reserve none so every deployment fits.
LIGHT = [f"{d}.num_cpus=0" for d in ("ingress", "fused", "router", "experts")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_metrics():
    """Local Ray exporting Prometheus metrics on a free port (returned)."""
    import ray

    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=port,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def world(ray_metrics, tmp_path_factory):
    from ray import serve

    from loramix.versions import publish
    from pipelines.serve import deploy, settings

    root = tmp_path_factory.mktemp("serve")
    assert publish(root / "run", demo_artifact(root / "staged")) == 1  # served as a published version
    art = str(root / "run" / "artifact")
    port = free_port()
    url = deploy(art, settings(art, LIGHT + ["max_tokens_limit=64"], port=port, topology="fused"))
    yield {"artifact": art, "url": url, "port": port, "engine": Engine.from_artifact(art), "metrics": ray_metrics}
    serve.shutdown()


@pytest.fixture(scope="module")
def client(world):
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key="unused", max_retries=0)


def reference(engine: Engine, text: str, max_tokens: int, weights=None) -> str:
    """What MixtureModel.generate answers for ``text`` (greedy), as text."""
    ids = torch.tensor([engine.encode(text)])
    w = None if weights is None else torch.tensor([weights])
    eos = engine.tokenizer.eos_token_id
    out = engine.mixture.generate(ids, max_new_tokens=max_tokens, expert_weights=w, pad_token_id=0, eos_token_id=eos)
    return engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def onehot(name):
    return [float(n == name) for n in EXPERTS]


def handle_stats(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, "loramix").stats.remote().result()


# --------------------------------------------------------------------------------------- fused
def test_completions_match_generate(world, client):
    prompts = list(PROMPTS.values())
    r = client.completions.create(model="loramix", prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in r.choices] == [reference(world["engine"], p, 10) for p in prompts]
    assert len({c.text for c in r.choices}) == 3, "sanity: different domains answer differently"
    assert all(c.route["version"] == 1 for c in r.choices)  # the artifact version that answered
    for c, name in zip(r.choices, PROMPTS):  # the trained router sends each prompt to its domain
        assert (
            c.route["deployment"] == "fused" and max(c.route["expert_weights"].items(), key=lambda kv: kv[1])[0] == name
        )
    n_prompt = sum(len(world["engine"].encode(p)) for p in prompts)
    assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens


def test_chat_models_and_streaming(world, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["loramix"] + [f"loramix:{n}" for n in EXPERTS]
    assert {m["version"] for m in requests.get(world["url"] + "/v1/models").json()["data"]} == {1}
    text = PROMPTS["sort"]
    chat = client.chat.completions.create(
        model="loramix", messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content == reference(world["engine"], text, 8)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(
        client.completions.create(
            model="loramix",
            prompt=text,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == reference(world["engine"], text, 8)
    assert chunks[0].choices[0].route["expert_weights"] is not None
    assert chunks[-1].usage.prompt_tokens == len(world["engine"].encode(text))
    streamed = client.chat.completions.create(
        model="loramix", messages=[{"role": "user", "content": text}], max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_stop_and_seed_over_http(world, client):
    text = PROMPTS["reverse"]
    full = reference(world["engine"], text, 12)
    assert len(full) >= 4
    r = client.completions.create(model="loramix", prompt=text, max_tokens=12, temperature=0, stop=[full[2:4]])
    assert r.choices[0].text == full[: full.index(full[2:4])] and r.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model="loramix", prompt=text, max_tokens=12, temperature=1.5, seed=s).choices[0].text
        for s in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1] != sampled[2]


def test_pinned_experts_and_explicit_weights(world, client):
    text, engine = PROMPTS["reverse"], world["engine"]
    answers = {}
    for name in EXPERTS:
        r = client.completions.create(model=f"loramix:{name}", prompt=text, max_tokens=8, temperature=0)
        answers[name] = r.choices[0].text
        assert answers[name] == reference(engine, text, 8, onehot(name))
        assert r.choices[0].route["pinned"] == name
    assert len(set(answers.values())) > 1
    r = client.completions.create(
        model="loramix", prompt=text, max_tokens=8, temperature=0, extra_body={"expert": "sort"}
    )
    assert r.choices[0].text == answers["sort"]
    r = client.completions.create(
        model="loramix",
        prompt=text,
        max_tokens=8,
        temperature=0,
        extra_body={"expert_weights": {"sort": 1, "shift": 3}},
    )
    assert r.choices[0].text == reference(engine, text, 8, [0.0, 0.25, 0.75])
    assert r.choices[0].route["expert_weights"] == {"reverse": 0.0, "sort": 0.25, "shift": 0.75}


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": "a"}, 400, "model"),
    ({"model": "loramix"}, 400, "prompt"),
    ({"model": "loramix", "prompt": 7}, 400, "prompt"),
    ({"model": "loramix", "prompt": "a", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": "loramix", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "loramix", "prompt": "a", "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "loramix", "prompt": "a" * 100, "max_tokens": 64}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ({"model": "loramix", "prompt": "a", "expert": "nope"}, 400, "expert"),
    ({"model": "loramix", "prompt": "a", "expert_weights": {"sort": -1}}, 400, "expert_weights"),
    ({"model": "loramix", "prompt": "a", "expert_weights": {"sort": 0}}, 400, "expert_weights"),
    ({"model": "loramix", "prompt": "a", "expert_weights": {"nope": 1}}, 400, "expert_weights"),
    ({"model": "loramix", "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ({"model": "loramix", "prompt": "a" * 2_000_000}, 413, None),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=range(len(BAD)))
def test_bad_input_gets_a_clear_error(world, body, status, param):
    url = world["url"] + "/v1/completions"
    r = requests.post(url, data=body) if isinstance(body, bytes) else requests.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"]


def test_chat_bad_input_and_server_survives(world, client):
    url = world["url"] + "/v1/chat/completions"
    r = requests.post(url, json={"model": "loramix", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = requests.post(url, json={"model": "loramix", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    pid = handle_stats("fused")["pid"]
    ok = client.completions.create(model="loramix", prompt=PROMPTS["shift"], max_tokens=4, temperature=0)
    assert ok.choices[0].text == reference(world["engine"], PROMPTS["shift"], 4)
    assert handle_stats("fused")["pid"] == pid, "no replica restarted"
    assert requests.get(world["url"] + "/healthz").json() == {"status": "ok"}


def test_load_many_concurrent_clients(world):
    """200 requests, 16 at a time, over every expert and the router: zero errors."""
    models = ["loramix"] + [f"loramix:{n}" for n in EXPERTS]
    jobs = [(models[i % 4], list(PROMPTS.values())[i % 3]) for i in range(200)]
    client = openai.OpenAI(base_url=world["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)

    def call(job):
        start = time.perf_counter()
        r = client.completions.create(model=job[0], prompt=job[1], max_tokens=8, temperature=0)
        return time.perf_counter() - start, r.choices[0].finish_reason

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    wall = time.perf_counter() - start
    latencies = sorted(t for t, _ in results)
    assert len(results) == 200 and all(reason in ("stop", "length") for _, reason in results)
    p50, p99 = statistics.median(latencies), latencies[int(0.99 * len(latencies)) - 1]
    print(f"\nload: 200 requests, 16 clients: {200 / wall:.1f} req/s, p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")


def scrape(port: int, name: str, **labels) -> float:
    """Sum of a Prometheus series on the node's metrics endpoint, over samples matching ``labels``."""
    total = 0.0
    for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_per_expert(world, client):
    for _ in range(3):
        client.completions.create(model="loramix:shift", prompt=PROMPTS["sort"], max_tokens=4, temperature=0)
    deadline, seen = time.time() + 60, 0.0
    while time.time() < deadline and seen < 3:  # Ray exports metrics every few seconds
        time.sleep(2)
        seen = scrape(world["metrics"], "ray_loramix_requests_total", expert="shift", model="loramix:shift")
    assert seen >= 3
    assert scrape(world["metrics"], "ray_loramix_completion_tokens_total", expert="shift") >= 3
    assert scrape(world["metrics"], "ray_loramix_latency_s_count", expert="shift") >= 3


# Requests that pass the schema's types but that a batch must not share: each is refused alone
# (400 naming the field) while good requests in flight beside it answer as if alone.
POISON = [
    ('{"model": "loramix", "prompt": "sort ab=", "seed": 99999999999999999999}', "seed"),
    ('{"model": "loramix", "prompt": "sort ab=", "temperature": 1e-30}', "temperature"),
    ('{"model": "loramix", "prompt": "bad \\ud800 text"}', "prompt"),
    ('{"model": "loramix", "prompt": "sort ab=", "stop": [""]}', "stop"),
    ('{"model": "loramix", "prompt": "sort ab=", "logprobs": 2}', "logprobs"),
    ("[" * 100_000 + "]" * 100_000, None),
]


def test_poisoned_requests_fail_alone_among_good_ones(world):
    """Bad and good requests at once, so they share batches: every bad one gets a 4xx error
    object, every good one its greedy answer, and no replica restarts."""
    pid = handle_stats("fused")["pid"]
    url, engine = world["url"] + "/v1/completions", world["engine"]
    good = [(name, text) for name, text in PROMPTS.items()] * 3

    def bad(body):
        return requests.post(url, data=body.encode(), headers={"Content-Type": "application/json"}, timeout=60)

    def ok(job):
        body = {"model": "loramix", "prompt": job[1], "max_tokens": 8, "temperature": 0}
        return requests.post(url, json=body, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        bad_answers = [pool.submit(bad, body) for body, _ in POISON]
        good_answers = [pool.submit(ok, job) for job in good]
        bad_answers = [f.result() for f in bad_answers]
        good_answers = [f.result() for f in good_answers]
    for (body, param), r in zip(POISON, bad_answers):
        assert 400 <= r.status_code < 500, (body[:80], r.status_code, r.text[:200])
        error = r.json()["error"]
        assert error["message"] and (param is None or error["param"] == param), (body[:80], error)
    # weights whose sum overflows float64 are normalised safely (never NaN gates): an even mix
    body = {"model": "loramix", "prompt": "sort ab=", "max_tokens": 8, "temperature": 0}
    huge = requests.post(url, json={**body, "expert_weights": {"sort": 1e308, "shift": 1e308}}, timeout=60)
    assert huge.status_code == 200 and huge.json()["choices"][0]["text"] == reference(
        engine, "sort ab=", 8, [0, 0.5, 0.5]
    )
    for (name, text), r in zip(good, good_answers):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference(engine, text, 8), (name, r.text)
    assert handle_stats("fused")["pid"] == pid, "no replica restarted"


def test_a_client_that_disconnects_stops_its_rows_decoding(world):
    """Close a streaming request after its first event: Serve cancels the replica's generator,
    which marks the row cancelled (it stops decoding at the next step)."""
    body = {"model": "loramix", "prompt": PROMPTS["sort"], "max_tokens": 64, "temperature": 1.0, "seed": 3}
    stream = {**body, "stream": True}

    def running() -> bool:
        return any(s["running"] for s in handle_stats("fused")["scheduler"].values())

    # 64 tokens of this model decode in ~0.2 s: on a loaded machine the hang-up can reach the
    # replica after the answer finished, which tests nothing; then hang up on another one.
    for _ in range(3):
        before = handle_stats("fused")["cancelled"]
        with requests.post(world["url"] + "/v1/completions", json=stream, stream=True, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first event arrived: decoding is under way
        deadline = time.monotonic() + 20
        while handle_stats("fused")["cancelled"] == before and time.monotonic() < deadline:
            if not running():  # it finished (or was cancelled): the counter says which
                time.sleep(1)
                break
            time.sleep(0.2)
        if handle_stats("fused")["cancelled"] > before:
            break
    assert handle_stats("fused")["cancelled"] == before + 1
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running()  # its slot is free
    ok = post(world["url"], {**body, "max_tokens": 4})  # and the replica serves on
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_client_that_hangs_up_on_a_whole_answer_frees_its_slot(world):
    """Non-streaming requests are one call to the replica (not a stream of tokens): closing the
    connection mid-answer cancels that call too, and the rows stop decoding."""
    before = handle_stats("fused")["cancelled"]
    socks = []
    for seed in range(6):  # several long answers at once: some are surely still decoding when we hang up
        body = {"model": "loramix", "prompt": PROMPTS["sort"], "max_tokens": 64, "temperature": 1.0, "seed": seed}
        data = json.dumps(body)
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock = socket.create_connection(("127.0.0.1", world["port"]))
        sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n{data}".encode())
        socks.append(sock)

    def running() -> int:
        return sum(s["running"] for s in handle_stats("fused")["scheduler"].values())

    deadline = time.monotonic() + 20
    while not running() and time.monotonic() < deadline:
        time.sleep(0.01)
    for sock in socks:
        sock.close()
    while handle_stats("fused")["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle_stats("fused")["cancelled"] > before
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not running()  # every slot is free


def test_serve_update_switches_versions_under_load_without_a_failed_request(world, tmp_path):
    """16 clients on every expert and the router; a new version with one more expert is published
    and `serve-update` moves the running app to it, then back: no request fails, requests after
    the switch can pin the new expert and are answered by v2, and the old experts' greedy answers
    are unchanged (each request is decoded by the version it was planned for)."""
    import threading

    from loramix.versions import publish, set_pointer
    from pipelines.serve import update

    run, engine = Path(world["artifact"]).parent, world["engine"]
    assert publish(run, demo_artifact(tmp_path / "staged2", experts=(*EXPERTS, "rotate"))) == 2
    models = ["loramix"] + [f"loramix:{n}" for n in EXPERTS]
    expected = {f"loramix:{n}": reference(engine, PROMPTS[n], 8, [float(n == e) for e in EXPERTS]) for n in EXPERTS}
    answers: list[tuple[str, float, int, dict]] = []  # (model, sent, status, body)
    stop = threading.Event()

    def client(i: int):
        while not stop.is_set():
            model = models[i % len(models)]
            prompt = PROMPTS[model.split(":")[1]] if ":" in model else list(PROMPTS.values())[i % 3]
            sent = time.monotonic()
            r = post(world["url"], {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60)
            answers.append((model, sent, r.status_code, r.json()))
            i += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    try:
        for c in clients:
            c.start()
        time.sleep(3)
        moved = update(str(run), 2)
        switched = time.monotonic()
        pinned = post(world["url"], {"model": "loramix:rotate", "prompt": "rotate hello=", "max_tokens": 8})
        assert pinned.status_code == 200, pinned.text
        route = pinned.json()["choices"][0]["route"]
        assert route["version"] == 2 and route["expert_weights"]["rotate"] == 1.0
        listed = requests.get(world["url"] + "/v1/models").json()["data"]
        assert "loramix:rotate" in [m["id"] for m in listed] and {m["version"] for m in listed} == {2}
        time.sleep(3)
        rolling_back = time.monotonic()
        back = update(str(run), 1)
        assert requests.get(world["url"] + "/v1/models").json()["data"][0]["version"] == 1
        assert post(world["url"], {"model": "loramix:rotate", "prompt": "rotate hello="}).status_code == 404
        time.sleep(2)
    finally:
        stop.set()
        for c in clients:
            c.join(60)
        set_pointer(run, 1)  # the module's other tests read the run's v1
    failed = [(m, code, b) for m, _, code, b in answers if code != 200]
    assert not failed, failed[:3]
    versions = [b["choices"][0]["route"]["version"] for _, _, _, b in answers]
    assert {1, 2} <= set(versions), "requests were answered by both versions"
    assert all(b["choices"][0]["route"]["version"] == 2 for _, t, _, b in answers if switched < t < rolling_back)
    assert all(b["choices"][0]["text"] == expected[m] for m, _, _, b in answers if m in expected)
    print(
        f"\nserve-update under 16 clients: v1->v2 in {moved['seconds']:.1f} s, v2->v1 in {back['seconds']:.1f} s; "
        f"{len(answers)} requests, {len(failed)} failed"
    )


# -------------------------------------------------------------------------------------- routed
@pytest.fixture(scope="module")
def routed(world):
    """The routed topology with an API key, deployed by the real `loramix serve` command."""
    import ray

    cmd = [
        sys.executable,
        "-m",
        "pipelines.cli",
        "serve",
        world["artifact"],
        "--topology",
        "routed",
        "--port",
        str(world["port"]),
        "--api-key",
        "sekret",
        "--detach",
        "--address",
        ray.get_runtime_context().gcs_address,
        "route_threshold=0.6",
        *LIGHT,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at {world['url']}/v1" in done.stdout
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key="sekret", max_retries=0)


def test_api_key_required(world, routed):
    before = handle_stats("fused")["requests"]
    body = {"model": "loramix", "prompt": "sort ab=", "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = requests.post(world["url"] + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(world["url"] + "/v1/models").status_code == 401
    assert requests.get(world["url"] + "/healthz").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=world["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert handle_stats("fused")["requests"] == before, "rejected requests did no work"
    assert len(routed.models.list().data) == 4


def test_routed_dispatch_goes_to_the_expert_deployment(world, routed):
    engine = world["engine"]
    for name, text in PROMPTS.items():
        route = engine.route([engine.encode(text)])[0]
        assert EXPERTS[max(range(3), key=route.__getitem__)] == name and max(route) >= 0.6
        before = handle_stats(f"expert-{name}")["requests"]
        r = routed.completions.create(model="loramix", prompt=text, max_tokens=8, temperature=0)
        assert r.choices[0].route["deployment"] == f"expert:{name}"
        assert handle_stats(f"expert-{name}")["requests"] == before + 1
        # the merged expert answers as the mixture does with that expert alone
        assert r.choices[0].text == reference(engine, text, 8, onehot(name))
    pinned = routed.completions.create(model="loramix:shift", prompt=PROMPTS["reverse"], max_tokens=8, temperature=0)
    assert pinned.choices[0].route["deployment"] == "expert:shift"
    assert pinned.choices[0].text == reference(engine, PROMPTS["reverse"], 8, onehot("shift"))
    mixed = routed.completions.create(
        model="loramix",
        prompt=PROMPTS["reverse"],
        max_tokens=8,
        temperature=0,
        extra_body={"expert_weights": {"reverse": 1, "sort": 1}},
    )
    assert mixed.choices[0].route["deployment"] == "fused"
    assert mixed.choices[0].text == reference(engine, PROMPTS["reverse"], 8, [0.5, 0.5, 0.0])


# --------------------------------------------------------------------- overload and a crash (last:
# they redeploy the app with their own limits)
def post(url: str, body: dict, timeout: float = 60):
    return requests.post(url + "/v1/completions", json=body, timeout=timeout)


def redeploy_open(world, overrides=()) -> str:
    """Redeploy the fused app without an API key and wait until the old (keyed) ingress replicas
    are gone: a rolling update keeps them answering for a few seconds after `deploy` returns."""
    from pipelines.serve import deploy, settings

    cfg = settings(world["artifact"], LIGHT + list(overrides), port=world["port"], topology="fused")
    url = deploy(world["artifact"], cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:  # the proxy holds requests while no ingress replica is up (a slow start on a busy machine)
            if all(requests.get(url + "/v1/models", timeout=10).status_code == 200 for _ in range(5)):
                return url
        except requests.Timeout:
            pass
        time.sleep(0.5)
    raise AssertionError("the keyed ingress replicas were still answering after 60 s")


def test_overload_is_answered_at_once_with_503_and_retry_after(world):
    limits = ["fused.max_ongoing_requests=1", "fused.max_queued_requests=1", "max_running_requests=1"]
    url = redeploy_open(world, limits)
    body = {"model": "loramix", "prompt": PROMPTS["sort"], "max_tokens": 48, "temperature": 1.0, "seed": 1}
    answers = []
    for _ in range(5):  # new limits reach the ingress's handle within seconds (a config push, no restart)
        with ThreadPoolExecutor(24) as pool:
            burst = list(pool.map(lambda _: post(url, body), range(24)))
        answers += burst
        if any(r.status_code == 503 for r in burst):
            break
        time.sleep(2)
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) == {200, 503}, statuses  # never a 500, never a hang (each call has a timeout)
    for refused in (r for r in answers if r.status_code == 503):
        assert "Retry-After" in refused.headers, (refused.headers, refused.text)
        assert refused.json()["error"]["code"] == "overloaded"
    assert post(url, {**body, "max_tokens": 4}).status_code == 200  # and it serves again once the burst is over


def test_a_killed_replica_is_replaced_and_no_request_hangs(world):
    """Kill the model replica under a bounded load (4 clients): requests in the gap fail with an
    error object or wait for the new replica, none hangs; Serve starts a new replica by itself and
    the answers are again the same greedy text."""
    import threading

    import ray

    url, engine = redeploy_open(world), world["engine"]

    def fused_replicas():
        named = ray.util.list_named_actors(all_namespaces=True)
        return [a for a in named if a["name"].startswith("SERVE_REPLICA::loramix#fused")]

    deadline = time.monotonic() + 60
    while len(fused_replicas()) != 1 and time.monotonic() < deadline:  # the rolling update has finished
        time.sleep(0.5)
    (replica,) = fused_replicas()
    body = {"model": "loramix", "prompt": PROMPTS["shift"], "max_tokens": 8, "temperature": 0}
    expected = reference(engine, PROMPTS["shift"], 8)
    answers: list[tuple[float, float, int, dict]] = []  # (sent, answered, status, body)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            sent = time.monotonic()
            r = post(url, body, timeout=30)  # a hang would raise here
            answers.append((sent, time.monotonic(), r.status_code, r.json()))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    time.sleep(2)
    killed = time.monotonic()
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    recovered = None
    while time.monotonic() - killed < 90 and recovered is None:
        time.sleep(0.5)
        ok = [done - killed for sent, done, code, _ in list(answers) if sent > killed and code == 200]
        recovered = min(ok) if ok else None
    time.sleep(2)
    stop.set()
    for c in clients:
        c.join(60)
    assert recovered is not None and recovered < 60, f"not serving again 60 s after the kill: {answers[-5:]}"
    failed = [(code, b) for _, _, code, b in answers if code != 200]
    assert all("error" in b and b["error"]["message"] for _, b in failed), failed[:3]
    assert all(b["choices"][0]["text"] == expected for _, _, code, b in answers if code == 200)
    assert requests.get(url + "/readyz").status_code == 200
    print(
        f"\nreplica killed under 4 clients: serving again after {recovered:.1f} s; "
        f"{len(failed)} of {len(answers)} requests failed (statuses {sorted({c for c, _ in failed})})"
    )
