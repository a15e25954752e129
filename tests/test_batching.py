"""Continuous batching (loramix.batching): requests join and leave the running batch at any step,
and every greedy row still equals MixtureModel.generate token for token."""

import threading

import pytest
import torch
from helpers import drive
from test_serving import PROMPTS, reference

from loramix.batching import Scheduler
from loramix.kv_slots import SlotCache, compaction, slot_mask
from loramix.serving import Engine, GenerationRequest, SamplingParams
from loramix.synthetic import demo_artifact


@pytest.fixture(scope="module", params=["moa", "mole", "modula"])
def engine(request, tmp_path_factory) -> Engine:
    path = demo_artifact(tmp_path_factory.mktemp(request.param) / "artifact", recipe=request.param, top_k=2)
    return Engine.from_artifact(path)


def request(engine, text, max_tokens=10, weights=None, **params):
    return GenerationRequest(engine.encode(text), SamplingParams(max_tokens=max_tokens, **params), weights)


def tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def onehot(engine, i):
    return [float(j == i) for j in range(len(engine.expert_names))]


def test_staggered_arrivals_of_routed_and_pinned_requests_equal_generate(engine):
    """Requests arrive while others decode (routed, explicit weights, different lengths): each
    greedy row gives generate's tokens, whatever shared its steps and whenever it arrived."""
    texts = [*PROMPTS, PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    weights = [None] * 4 + [onehot(engine, 0), onehot(engine, 1), [0.5, 0.5, *[0.0] * (len(engine.expert_names) - 2)]]
    lengths = [10, 3, 7, 12, 5, 9, 6]
    reqs = [request(engine, t, n, w) for t, n, w in zip(texts, lengths, weights)]
    scheduler = Scheduler(engine, max_running=4)
    out = drive(scheduler, reqs, {0: [0, 1], 1: [2], 3: [3, 4], 4: [5], 9: [6]})  # step -> requests arriving before it
    for r, ds, text in zip(reqs, out, texts):
        assert tokens(ds) == reference(engine, text, r.params.max_tokens, r.expert_weights)
        assert ds[-1].finish_reason in ("stop", "length") and all(d.finish_reason is None for d in ds[:-1])
        assert ds[0].route is not None and sum(ds[0].route) == pytest.approx(1.0, abs=1e-5)
    assert tokens(out[4]) != tokens(out[5]), "sanity: experts must answer differently"
    assert scheduler.stats()["finished"] == len(reqs) and scheduler.running == 0


def test_a_request_joins_the_running_batch_at_the_next_step(engine):
    """No waiting for the batch to drain: a request submitted while a long one decodes emits its
    first token at the next step and finishes long before the long one."""
    scheduler = Scheduler(engine)
    long_out, short_out = [], []
    # a request that decodes past this test's steps: a random router may answer EOS at once, so
    # take the first prompt and routing whose greedy answer is long (generate's reference says so)
    routings = [None] + [onehot(engine, i) for i in range(len(engine.expert_names))]
    options = [(text, w) for w in routings for text in PROMPTS]
    text, weights = next((t, w) for t, w in options if len(reference(engine, t, 8, w)) == 8)
    scheduler.submit(request(engine, text, 40, weights, stop=()), long_out.append)
    scheduler.step()
    scheduler.step()
    scheduler.submit(request(engine, PROMPTS[3], 2), short_out.append)
    scheduler.step()
    assert len(short_out) == 1 and scheduler.running == 2  # admitted and prefilled in this step
    scheduler.step()
    assert short_out[-1].finish_reason is not None  # done: its slot is free again
    assert scheduler.running == 1 and long_out[-1].finish_reason is None  # the long one decodes on


def test_a_busy_engine_gathers_free_slots_for_long_requests_but_admits_short_ones_at_once(engine):
    """With fewer free slots than `admit_batch`, a waiting request waits for more to free up (one
    prefill for several rows) for at most ADMIT_EVERY steps and 1/GATHER_SHARE of its `max_tokens`:
    a 64-token answer waits 4 steps, an 8-token one is admitted at the next step."""
    from loramix.batching import ADMIT_EVERY, GATHER_SHARE

    assert 64 // GATHER_SHARE >= ADMIT_EVERY > 8 // GATHER_SHARE
    scheduler = Scheduler(engine, max_running=24)  # admit_batch 3
    routings = [None] + [onehot(engine, i) for i in range(len(engine.expert_names))]
    text, weights = next((t, w) for w in routings for t in PROMPTS if len(reference(engine, t, 8, w)) == 8)
    for _ in range(22):  # running until step 8: two slots free
        scheduler.submit(request(engine, text, 8, weights), lambda d: None)
    scheduler.step()
    long_out, short_out = [], []
    scheduler.submit(request(engine, text, 64, weights), long_out.append)
    for _ in range(ADMIT_EVERY - 1):
        scheduler.step()
    assert not long_out and scheduler.running == 22  # gathering
    scheduler.step()
    assert long_out and scheduler.running == 23  # waited ADMIT_EVERY steps, then admitted alone
    scheduler.submit(request(engine, PROMPTS[3], 8), short_out.append)
    scheduler.step()
    assert short_out and scheduler.running == 24  # at once


def test_streaming_emits_each_token_the_step_it_is_decoded(engine):
    scheduler = Scheduler(engine)
    out = []
    scheduler.submit(request(engine, PROMPTS[0], 6), out.append)
    seen = []
    while not scheduler.idle():
        scheduler.step()
        seen.append(len(out))
    assert seen == list(range(1, len(out) + 1))  # one Delta per step, none held back
    assert tokens(out) == reference(engine, PROMPTS[0], 6)


def test_max_running_requests_caps_the_batch_and_the_rest_wait_in_order(engine):
    reqs = [request(engine, t, 4) for t in PROMPTS * 2]
    out = [[] for _ in reqs]
    scheduler = Scheduler(engine, max_running=3)
    for r, o in zip(reqs, out):
        scheduler.submit(r, o.append)
    firsts, running = [], []
    while not scheduler.idle():
        scheduler.step()
        running.append(scheduler.running)
        firsts.append([i for i, o in enumerate(out) if o])
    assert max(running) == 3
    started = [min(s for s, f in enumerate(firsts) if i in f) for i in range(len(reqs))]
    assert started == sorted(started)  # admitted in arrival order
    for o, t in zip(out, PROMPTS * 2):
        assert tokens(o) == reference(engine, t, 4)


def test_max_batched_tokens_limits_the_prompts_admitted_per_step(engine):
    n = len(engine.encode(PROMPTS[0]))
    scheduler = Scheduler(engine, max_batched_tokens=2 * n)
    out = [[] for _ in range(4)]
    for o in out:
        scheduler.submit(request(engine, PROMPTS[0], 8), o.append)
    scheduler.step()
    assert scheduler.running == 2 and len(scheduler.waiting) == 2
    lone = Scheduler(engine, max_batched_tokens=1)  # a prompt over the whole budget still goes, alone
    got = lone.complete([request(engine, PROMPTS[0], 3), request(engine, PROMPTS[1], 3)])
    assert [c.token_ids for c in got] == [reference(engine, p, 3) for p in PROMPTS[:2]]


def test_a_cancelled_row_frees_its_slot_the_next_step_and_the_others_finish(engine):
    scheduler = Scheduler(engine, max_running=2)
    gone = request(engine, PROMPTS[0], 40)
    gone = GenerationRequest(gone.prompt_ids, gone.params, None, threading.Event())
    keep, waiting = request(engine, PROMPTS[1], 12), request(engine, PROMPTS[2], 5)
    out = {"gone": [], "keep": [], "waiting": []}
    for name, r in (("gone", gone), ("keep", keep), ("waiting", waiting)):
        scheduler.submit(r, out[name].append)
    scheduler.step()
    assert scheduler.running == 2 and not out["waiting"]
    gone.cancel.set()
    emitted = len(out["gone"])
    scheduler.step()  # the cancelled row leaves; the waiting request takes its slot
    assert out["waiting"] and len(out["gone"]) == emitted
    while not scheduler.idle():
        scheduler.step()
    assert tokens(out["keep"]) == reference(engine, PROMPTS[1], 12)
    assert tokens(out["waiting"]) == reference(engine, PROMPTS[2], 5)
    assert not any(d.finish_reason for d in out["gone"])


def test_bad_requests_get_an_error_and_the_rest_decode(engine):
    good = request(engine, PROMPTS[0], 5)
    too_long = GenerationRequest([1] * 200, SamplingParams(max_tokens=8))
    bad_weights = request(engine, PROMPTS[1], 5, [1.0])
    got = Scheduler(engine).complete([good, too_long, ValueError("bad request payload: x"), bad_weights])
    assert got[0].token_ids == reference(engine, PROMPTS[0], 5)
    assert [c.finish_reason for c in got[1:]] == ["error"] * 3
    assert "context length" in got[1].error and "bad request payload" in got[2].error
    assert "expert_weights" in got[3].error


def test_a_failing_forward_ends_its_rows_with_an_error_and_the_engine_serves_on(engine, monkeypatch):
    from loramix import batching

    scheduler = Scheduler(engine)
    first = []
    scheduler.submit(request(engine, PROMPTS[0], 8), first.append)
    scheduler.step()
    with monkeypatch.context() as m:
        m.setattr(batching._Batch, "decode", lambda self, rows: (_ for _ in ()).throw(RuntimeError("boom")))
        scheduler.step()
    assert first[-1].finish_reason == "error" and "boom" in first[-1].error and scheduler.running == 0
    assert scheduler.complete([request(engine, PROMPTS[1], 5)])[0].token_ids == reference(engine, PROMPTS[1], 5)


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(engine):
    sampled = request(engine, PROMPTS[2], 8, temperature=1.0, seed=7)
    alone = Scheduler(engine).complete([sampled])[0].token_ids
    busy = Scheduler(engine).complete([request(engine, t, 12) for t in PROMPTS] + [sampled])[-1].token_ids
    assert alone == busy and len(alone) > 0


def test_the_thread_serves_requests_submitted_from_other_threads(engine):
    scheduler = Scheduler(engine).start()
    results, done = {}, threading.Barrier(5)

    def client(i):
        out, finished = [], threading.Event()

        def deliver(d):
            out.append(d)
            if d.finish_reason:
                finished.set()

        scheduler.submit(request(engine, PROMPTS[i % 4], 6), deliver)
        assert finished.wait(60)
        results[i] = tokens(out)
        done.wait()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    done.wait()
    scheduler.close()
    assert all(results[i] == reference(engine, PROMPTS[i % 4], 6) for i in range(4))


def test_a_merged_expert_decodes_continuously_too(tmp_path):
    path = demo_artifact(tmp_path / "artifact", recipe="moa", top_k=1)
    merged, fused = Engine.from_artifact(path, expert="reverse"), Engine.from_artifact(path)
    w = [float(n == "reverse") for n in fused.expert_names]
    got = Scheduler(merged).complete([request(merged, t, 8) for t in PROMPTS])
    assert [c.token_ids for c in got] == [reference(fused, t, 8, w) for t in PROMPTS]
    assert all(c.route is None for c in got)


def test_slot_cache_writes_each_row_at_its_own_position_and_masks_the_rest():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 1, 2, 1, 8

    cache = SlotCache(Config, slots=3, dtype=torch.float32, device=torch.device("cpu"))
    cache.bind(0, torch.tensor([[0, 1], [0, 1], [0, 1]]), 2)  # three prompts of 2 tokens
    cache.update(torch.ones(3, 1, 2, 4), torch.ones(3, 1, 2, 4), 0)
    cache.bind(0, torch.tensor([[2], [5], [3]]), 6)  # rows at different lengths, one forward
    k, _ = cache.update(torch.full((3, 1, 1, 4), 7.0), torch.zeros(3, 1, 1, 4), 0)
    assert k.shape == (3, 1, 6, 4) and cache.capacity >= 6
    assert k[0, 0, :3, 0].tolist() == [1, 1, 7] and k[1, 0, 5, 0] == 7 and k[2, 0, 3, 0] == 7
    mask = slot_mask(torch.tensor([[2], [5], [3]]), 6, "sdpa", torch.float32)
    assert mask[:, 0, 0].tolist() == [[True] * 3 + [False] * 3, [True] * 6, [True] * 4 + [False] * 2]
    eager = slot_mask(torch.tensor([[1]]), 3, "eager", torch.float32)
    assert eager[0, 0, 0, :2].tolist() == [0.0, 0.0] and eager[0, 0, 0, 2] == torch.finfo(torch.float32).min
    before = [k.clone() for k in cache.k]
    cache.keep([2, 0])  # rows leave: the others move down, in that order
    assert torch.equal(cache.k[0][:2], before[0][[2, 0]])


def test_compaction_moves_only_the_rows_above_the_survivors_into_the_holes():
    assert compaction([0, 1, 2]) == [0, 1, 2]  # nothing left: nothing moves
    order = compaction([0, 2, 3, 5, 6])  # slots 1 and 4 left: 6 and 5 take their places
    assert order == [0, 6, 2, 3, 5]
    assert [i for i, r in enumerate(order) if i != r] == [1, 4]  # two copies, one per slot that left
    assert compaction([3]) == [3] and compaction([]) == []


def test_a_closed_scheduler_asked_again_serves_again_and_a_crashing_step_answers_everyone(engine, monkeypatch):
    """A dropped version's scheduler is closed; a straggler planned for it must still be answered.
    A step that raises outside a forward ends what it holds with errors instead of a dead thread."""
    scheduler = Scheduler(engine).start()
    scheduler.close()
    for _ in range(100):  # the idle thread leaves
        if scheduler._thread is None:
            break
        threading.Event().wait(0.05)
    assert scheduler._thread is None
    done = threading.Event()
    out = []
    scheduler.submit(request(engine, PROMPTS[0], 4), lambda d: (out.append(d), d.finish_reason and done.set()))
    assert done.wait(30) and tokens(out) == reference(engine, PROMPTS[0], 4)

    from loramix import batching

    monkeypatch.setattr(batching._Batch, "sweep", lambda self: (_ for _ in ()).throw(RuntimeError("bad state")))
    failed = threading.Event()
    scheduler.submit(request(engine, PROMPTS[1], 4), lambda d: d.finish_reason == "error" and failed.set())
    scheduler.submit(request(engine, PROMPTS[2], 4), lambda d: None)
    assert failed.wait(30)
    monkeypatch.undo()
    again = threading.Event()
    scheduler.submit(request(engine, PROMPTS[3], 3), lambda d: d.finish_reason and again.set())
    assert again.wait(30)
    scheduler.close()
