"""Routers learn to separate domains; only the router changes; masking renormalises."""

import pytest
import torch
from helpers import assert_close
from tiny import VOCAB, tiny_llama

from loramix import MixtureModel, topk_gates
from loramix.config import RouterConfig
from loramix.data import IGNORE, Example, batches, collate
from loramix.router_training import train_router
from loramix.routers import BlockGate, RouterDims

CUE = 10  # domain d is cued by token CUE + d at the start of the prompt
SPAN = 32  # ... and its prompt words come from token ids [20 + SPAN * d, 20 + SPAN * (d + 1))


def distilled_domains(mm, n_per_domain=48, seed=0, prompt_len=6, gen=4):
    """Each domain's completions are what its own expert generates: only routing to it fits them."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for d in range(len(mm.expert_names)):
        body = torch.randint(20 + SPAN * d, 20 + SPAN * (d + 1), (n_per_domain, prompt_len - 1), generator=g)
        prompts = torch.cat([torch.full((n_per_domain, 1), CUE + d), body], 1)
        w = torch.zeros(n_per_domain, len(mm.expert_names))
        w[:, d] = 1
        out = mm.generate(input_ids=prompts, max_new_tokens=gen, expert_weights=w, pad_token_id=0)
        for row in out.tolist():
            examples.append(Example(row, [IGNORE] * prompt_len + row[prompt_len:], d, prompt_len))
    return examples


def route_accuracy(mm, examples):
    b = collate(examples, 0, prompt_only=True)
    picks = mm.route(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).argmax(-1)
    return (picks == b["domain"]).float().mean().item()


@pytest.mark.parametrize("recipe", ["moa", "mole", "modula"])
def test_router_learns_domains(router_adapters, recipe, steps=60, lr=0.02):
    torch.manual_seed(0)
    mm = MixtureModel.from_adapters(tiny_llama(0, init_range=0.15), router_adapters, router=recipe, top_k=3)
    train, held_out = distilled_domains(mm, seed=0), distilled_domains(mm, n_per_domain=16, seed=1)
    b = collate(held_out, 0)
    uniform = mm(**{k: b[k] for k in ("input_ids", "attention_mask", "labels")}, expert_weights=torch.ones(3) / 3).loss
    oracle = mm(
        **{k: b[k] for k in ("input_ids", "attention_mask", "labels")}, expert_weights=torch.eye(3)[b["domain"]]
    ).loss
    assert oracle < uniform - 1.0  # sanity: picking the right expert matters for this data
    experts_before = {n: p.clone() for n, p in mm.named_parameters() if "lora_" in n}
    router_before = {n: p.clone() for n, p in mm.router.named_parameters()}
    before = route_accuracy(mm, held_out)
    cfg = RouterConfig(steps=steps, batch_size=24, lr=lr, warmup_ratio=0.0, balance_coef=0.0)
    seen = []
    summary = train_router(cfg, mm, batches(train, 24, 0, steps=steps), report=lambda m, c: seen.append(m))
    after = route_accuracy(mm, held_out)
    assert after >= 0.95 and after > before, (before, after)
    assert summary["steps"] == steps and len(seen) == steps
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "router_entropy", "expert_load/sort"} <= set(seen[-1])
    assert all(torch.equal(p, experts_before[n]) for n, p in mm.named_parameters() if "lora_" in n)
    assert any(not torch.equal(p, router_before[n]) for n, p in mm.router.named_parameters())


def test_topk_renormalises():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, g = topk_gates(logits, 2)
    assert (g > 0).sum() == 2 and torch.allclose(g.sum(-1), torch.ones(1))
    p = logits.softmax(-1)[0]
    assert_close(probs[0], p, atol=1e-7)
    assert_close(g[0, :2], p[:2] / p[:2].sum(), atol=1e-6)


def test_straight_through_top1_has_the_dense_gradient():
    """A renormalised top-1 gate is the constant 1: without straight-through its router gets no
    gradient. With it, the forward value is still the sparse gate and the gradient is the softmax's."""
    logits = torch.tensor([[0.3, 0.1, -0.2]], requires_grad=True)
    weight = torch.tensor([[1.0, 2.0, 3.0]])
    _, plain = topk_gates(logits, 1)
    assert not plain.requires_grad or torch.autograd.grad((plain * weight).sum(), logits)[0].abs().sum() == 0
    probs, st = topk_gates(logits, 1, straight_through=True)
    assert torch.equal(st.detach(), torch.tensor([[1.0, 0.0, 0.0]]))
    (grad,) = torch.autograd.grad((st * weight).sum(), logits)
    (want,) = torch.autograd.grad((logits.softmax(-1) * weight).sum(), logits)
    assert grad.abs().sum() > 0
    assert_close(grad, want, atol=1e-7)


def test_mole_masking_renormalises(adapters):
    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router="mole", top_k=3)
    torch.manual_seed(0)
    with torch.no_grad():
        for gate in mm.router.gate.values():
            gate.normal_(0, 0.5)
    ids = torch.randint(3, VOCAB, (2, 5))
    full = mm.route(input_ids=ids)
    first = mm.gate_pattern(ids)["block.0"]  # later blocks read what earlier (masked) blocks mixed
    mm.mask_experts(["shift"])
    masked = mm.route(input_ids=ids)
    assert torch.all(masked[:, 2] == 0)
    assert_close(masked.sum(-1), torch.ones(2), atol=1e-6)
    masked_first = mm.gate_pattern(ids)["block.0"]
    assert_close(masked_first[:, 0] / masked_first[:, 1], first[:, 0] / first[:, 1], atol=1e-5)  # ratios kept
    mm.mask_experts([])
    assert_close(mm.route(input_ids=ids), full, atol=1e-6)


@pytest.mark.parametrize(
    "recipe, kwargs",
    [
        ("moa", {}),
        ("mole", {}),
        ("modula", {}),
        ("modula", {"context": "prompt"}),
        ("modula", {"context": "prompt_only"}),
    ],
)
def test_generate_with_cache_equals_without(adapters, recipe, kwargs):
    """Routing decided on the prompt survives KV-cache decoding (and matches full recompute)."""
    assert_cached_equals_fresh(MixtureModel.from_adapters(tiny_llama(0), adapters, router=recipe, top_k=2, **kwargs))


def assert_cached_equals_fresh(mm) -> None:
    """With a random router, generate with KV cache gives the tokens of a full recompute each step."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in mm.router.parameters():
            p.normal_(0, 0.5)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cached = mm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    fresh = mm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("recipe", ["moa", "mole", "modula"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_trains_for_every_recipe_and_top_k(router_adapters, recipe, top_k):
    """Parameters move and the training loss falls, sparse top-k included (straight-through)."""
    torch.manual_seed(0)
    mm = MixtureModel.from_adapters(tiny_llama(0, init_range=0.15), router_adapters, router=recipe, top_k=top_k)
    train = distilled_domains(mm, n_per_domain=24, seed=0)
    before = {n: p.clone() for n, p in mm.router.named_parameters()}
    seen = []
    cfg = RouterConfig(steps=30, batch_size=24, lr=0.05, warmup_ratio=0.0)
    summary = train_router(cfg, mm, batches(train, 24, 0, steps=30), report=lambda m, c: seen.append(m))
    moved = [n for n, p in mm.router.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "no router parameter changed"
    first, last = sum(summary["losses"][:5]) / 5, sum(summary["losses"][-5:]) / 5
    assert last < first, (first, last)


def test_mole_gate_hand_computed():
    """MoLE's gate (Eqs. 6-10) on numbers worked out by hand: one block, two experts, d = 2."""
    from loramix.layers import MixtureLinear
    from loramix.routing import Routing

    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.zero_()
    # expert 0: s B A x = x * (0, 4) pattern; expert 1 adds nothing on this input
    A = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # ranks: 0 -> expert 0, 1 -> expert 1
    B = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
    routing = Routing()
    layer = MixtureLinear(
        base, A, B, torch.tensor([0, 1]), torch.tensor([1.0, 1.0]), key="b.0.q", block=0, routing=routing
    )
    gate = BlockGate(["a", "b"], RouterDims(hidden_size=2, num_blocks=1, gate_layers={0: ("b.0.q", 2)}), top_k=2)
    with torch.no_grad():
        gate.gate["0"].copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        gate.log_temperature.fill_(torch.log(torch.tensor(0.5)))
    routing.router = gate
    gate.eval()
    x = torch.tensor([[[1.0, 0.0]]])  # one prompt of one token
    routing.begin(pool_mask=torch.ones(1, 1), record=[])
    layer(x)
    # branch 0: x + (0, 4) = (1, 4) -> layer norm (-1, 1); branch 1: x = (1, 0) -> (1, -1)
    # eps = (<(-1, 1), (1, -1)>, <(1, -1), (0, 0)>) = (-2, 0); softmax(eps / 0.5) = softmax(-4, 0)
    want = torch.tensor([[-4.0, 0.0]]).softmax(-1)
    assert_close(routing.call.block_gates[0], want, atol=1e-4)
    # and the block's output mixes the experts with those gates: y = g_0 * (0, 4) + g_1 * 0
    routing.begin(pool_mask=torch.ones(1, 1))
    assert_close(layer(x), want[0, 0] * torch.tensor([[[0.0, 4.0]]]), atol=1e-4)


def test_balance_loss_averages_over_blocks_then_logs():
    """-log prod_i q_i with q_i the mean over blocks (and batch) of expert i's probability."""
    from loramix.routing import RouteRecord, balance_loss

    p1 = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    p2 = torch.tensor([[0.5, 0.5], [0.7, 0.3]])
    records = [RouteRecord(p, p, None, f"block.{i}") for i, p in enumerate((p1, p2))]
    q = (p1.mean(0) + p2.mean(0)) / 2
    assert_close(balance_loss(records), -torch.log(q).sum(), atol=1e-6)


def test_prompt_context_is_the_mean_over_the_prompt_then_the_tokens_so_far():
    """`router.context: prompt`: every prompt token reads the mean of the whole (unpadded) prompt;
    each later token the mean of the prompt and the tokens after it up to itself."""
    from loramix.routing import CallState, context_mean

    x = torch.tensor([[[9.0], [1.0], [3.0], [5.0], [7.0]]])  # a pad, a prompt of 2, then 2 completion tokens
    attention = torch.tensor([[0, 1, 1, 1, 1]])
    prompt = torch.tensor([[0, 1, 1, 0, 0]])
    got = context_mean(CallState(pool_mask=prompt, attention_mask=attention), "l", x)[0, :, 0]
    assert torch.allclose(got[1:], torch.tensor([2.0, 2.0, 3.0, 4.0]))  # (1+3)/2, then (1+3+5)/3, (1+3+5+7)/4
    # decoding: the prompt's forward, then one cached token at a time, gives the same
    call = CallState(pool_mask=attention[:, :3], attention_mask=attention[:, :3], freeze=True)
    first = context_mean(call, "l", x[:, :3])[0, :, 0]
    steps = [context_mean(call, "l", x[:, i : i + 1])[0, 0, 0] for i in (3, 4)]
    assert torch.allclose(first[1:], torch.tensor([2.0, 2.0])) and torch.allclose(torch.stack(steps), got[3:])


def test_prompt_only_context_is_the_prompts_mean_for_every_token():
    """`router.context: prompt_only`: every token, prompt or generated, reads the prompt's mean."""
    from loramix.routing import CallState, context_mean

    x = torch.tensor([[[9.0], [1.0], [3.0], [5.0], [7.0]]])
    attention, prompt = torch.tensor([[0, 1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 0, 0]])
    got = context_mean(CallState(pool_mask=prompt, attention_mask=attention), "l", x, grow=False)[0, :, 0]
    assert torch.allclose(got[1:], torch.full((4,), 2.0))
    call = CallState(pool_mask=attention[:, :3], attention_mask=attention[:, :3], freeze=True)
    first = context_mean(call, "l", x[:, :3], grow=False)[0, :, 0]
    steps = [context_mean(call, "l", x[:, i : i + 1], grow=False)[0, 0, 0] for i in (3, 4)]
    assert torch.allclose(first[1:], torch.tensor([2.0, 2.0])) and torch.allclose(torch.stack(steps), got[3:])


def test_a_prompt_context_router_gates_an_lm_head_lora_from_the_whole_prompt(tmp_path):
    """The output head of a prompt's forward sees only the kept last position (generate keeps one
    logit): its context still comes from every prompt position, so cached decoding equals full
    recompute (it raised "a partial sequence without the prompt's forward first" before)."""
    from tiny import make_adapter

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    heads = {n: make_adapter(0, tmp_path / n, seed=i + 1, targets=targets) for i, n in enumerate("ab")}
    assert_cached_equals_fresh(
        MixtureModel.from_adapters(tiny_llama(0), heads, router="modula", top_k=2, context="prompt")
    )


@pytest.mark.parametrize("recipe", ["moa", "mole", "modula"])
def test_a_router_warm_starts_from_one_over_other_experts(router_adapters, recipe):
    """`add-domain` & co. retrain the router starting from the run's current one: an expert both
    routers have keeps its rows (by name, wherever its column moved), a new one starts at zero,
    what has no expert axis (MoLE's temperatures) is copied; other routers' weights are refused."""
    names = list(router_adapters)  # three experts
    old = MixtureModel.from_adapters(tiny_llama(0), {n: router_adapters[n] for n in names[:2]}, router=recipe)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in old.router.parameters():
            p.normal_()
    new_order = [names[2], names[1], names[0]]  # the new expert first, the kept ones swapped
    new = MixtureModel.from_adapters(tiny_llama(0), {n: router_adapters[n] for n in new_order}, router=recipe)
    kept = new.router.warm_start(old.router.state_dict(), old.expert_names)
    assert kept == [names[1], names[0]]
    was, now = old.router.state_dict(), new.router.state_dict()
    for key, value in now.items():
        if key.startswith(new.router.per_expert):
            assert torch.equal(value[0], torch.zeros_like(value[0])), key  # the new expert
            assert torch.equal(value[1], was[key][1]) and torch.equal(value[2], was[key][0]), key
        else:
            assert torch.equal(value, was[key]), key
    other = "moa" if recipe != "moa" else "modula"
    stranger = MixtureModel.from_adapters(tiny_llama(0), {n: router_adapters[n] for n in names[:2]}, router=other)
    with pytest.raises(ValueError, match="another kind of router"):
        new.router.warm_start(stranger.router.state_dict(), stranger.expert_names)


def test_a_saved_router_warm_starts_a_run_and_an_unusable_one_is_skipped(router_adapters, tmp_path, caplog):
    """`router.warm_start` names an artifact: its router's rows are read back from disk; one that
    is gone or of another recipe (the config changed since) leaves the router fresh, with a warning."""
    from loramix.stages import warm_start

    names = list(router_adapters)
    saved = MixtureModel.from_adapters(tiny_llama(0), router_adapters, router="modula")
    with torch.no_grad():
        for p in saved.router.parameters():
            p.normal_()
    saved.save_pretrained(tmp_path / "modula")
    MixtureModel.from_adapters(tiny_llama(0), router_adapters, router="moa").save_pretrained(tmp_path / "moa")
    fresh = MixtureModel.from_adapters(tiny_llama(0), router_adapters, router="modula")
    zeros = {k: v.clone() for k, v in fresh.router.state_dict().items()}
    for path in (tmp_path / "gone", tmp_path / "moa"):
        caplog.clear()
        assert "skipped" in warm_start(fresh.router, str(path))
        assert all(torch.equal(v, zeros[k]) for k, v in fresh.router.state_dict().items())
        assert "starts fresh" in caplog.text
    assert warm_start(fresh.router, str(tmp_path / "modula")) == {"from": str(tmp_path / "modula"), "kept": names}
    assert fresh.expert_names == names
    assert all(torch.equal(v, saved.router.state_dict()[k]) for k, v in fresh.router.state_dict().items())


@pytest.mark.parametrize("context", ["token", "prompt_only"])
def test_a_token_routers_decision_trains_only_its_own_gate(router_adapters, context):
    """A MoDULA gate reads its layer's input, which the gates before it shaped. The loss of one
    decision trains that decision's gate alone: with gradients through its input, the label loss of
    every later gate pulled the first block's gates towards whichever expert made the later inputs
    easiest to route (demo world: `rotate` sent to `shift`'s v_proj, mixture 0.712 vs oracle 0.929)."""
    from loramix.data import prompt_mask
    from loramix.names import safe_key

    torch.manual_seed(0)
    mm = MixtureModel.from_adapters(
        tiny_llama(0, init_range=0.15), router_adapters, router="modula", top_k=3, context=context
    )
    for p in mm.router.parameters():
        torch.nn.init.normal_(p, std=0.5)  # a trained router: every gate depends on its input
    b = collate(distilled_domains(mm, n_per_domain=4, seed=0), 0)
    mm.train()
    out = mm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], route_mask=prompt_mask(b))
    last = out.routes[-2]  # a decision after every block's attention gates
    assert last.where.startswith("model.layers.")
    (-last.probs[..., 0].log().mean()).backward()
    grads = {k: lin.weight.grad for k, lin in mm.router.gate.items()}
    assert grads[safe_key(last.where)].abs().sum() > 0
    trained = [k for k, g in grads.items() if k != safe_key(last.where) and g is not None and g.abs().sum() > 0]
    assert not trained, f"the loss of {last.where} trained other gates: {trained}"
