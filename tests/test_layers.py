"""MixtureLinear alone: gates per sequence / token, skipping, universal flan / res."""

import pytest
import torch
from helpers import assert_close
from tiny import TinyMLP

from loramix.layers import MixtureLinear
from loramix.routing import Routing


def make_layer(ranks=(2, 3, 4), universal=None, variant="flan", seed=0, d_in=10, d_out=20):
    torch.manual_seed(seed)
    base = TinyMLP().lin0
    A = [torch.randn(r, d_out if variant == "res" else d_in) for r in ranks]
    B = [torch.randn(d_out, r) for r in ranks]
    owner = torch.cat([torch.full((r,), i) for i, r in enumerate(ranks)])
    scale = torch.cat([torch.full((r,), 0.5 * (i + 1)) for i, r in enumerate(ranks)])
    routing = Routing()
    routing.begin()  # one call's state, as MixtureModel opens it
    layer = MixtureLinear(
        base,
        torch.cat(A),
        torch.cat(B, 1),
        owner,
        scale,
        key="lin0",
        block=None,
        routing=routing,
        universal=universal,
        variant=variant,
    )
    return layer, routing, A, B


def expert_out(layer, A, B, i, x):
    return 0.5 * (i + 1) * (x @ A[i].T @ B[i].T)


def test_uniform_gates_give_mean_of_experts():
    layer, routing, A, B = make_layer()
    x = torch.randn(4, 5, 10)
    base = layer.base_layer(x)
    routing.call.set_weights(torch.full((4, 3), 1 / 3))
    want = base + sum(expert_out(layer, A, B, i, x) for i in range(3)) / 3
    assert_close(layer(x), want)


def test_token_gates():
    layer, routing, A, B = make_layer()
    x = torch.randn(2, 6, 10)
    gates = torch.rand(2, 6, 3)

    class Fixed:
        def layer_gates(self, routing, layer, x):
            return gates

    routing.router = Fixed()
    want = layer.base_layer(x) + sum(gates[..., i : i + 1] * expert_out(layer, A, B, i, x) for i in range(3))
    assert_close(layer(x), want)


def test_zero_gate_experts_are_skipped_with_same_result():
    layer, routing, A, B = make_layer()
    x = torch.randn(3, 4, 10)
    w = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.0]])
    routing.call.set_weights(w)
    out = layer(x)
    assert routing.call.active == (False, True, False)
    assert list(layer._slices[routing.call.active].tolist()) == [2, 3, 4]  # only expert 1's ranks
    want = layer.base_layer(x) + w[:, 1, None, None] * expert_out(layer, A, B, 1, x)
    assert_close(out, want)


def test_res_trunk_feeds_experts_through_leaky_relu():
    """MoDULA-Res: h = s_u B_u A_u x, y = W0 x + h + sum_i g_i s_i B_i LeakyReLU(A_i h)."""
    torch.manual_seed(1)
    uA, uB = torch.randn(3, 10), torch.randn(20, 3)
    x = torch.randn(2, 12, 10)
    # the first weights take the concatenated path, the second (one expert per row) the per-row path
    for w in (torch.tensor([[0.2, 0.8, 0.0], [1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])):
        layer, routing, A, B = make_layer(universal=(uA, uB, 2.0), variant="res")
        routing.call.set_weights(w)
        h = 2.0 * (x @ uA.T @ uB.T)
        act = lambda t: torch.where(t > 0, t, 0.01 * t)  # noqa: E731
        experts = sum(w[:, i, None, None] * 0.5 * (i + 1) * (act(h @ A[i].T) @ B[i].T) for i in range(3))
        assert_close(layer(x), layer.base_layer(x) + h + experts, atol=1e-4)


def test_res_hand_computed():
    """The Res equation pinned on numbers worked out by hand (1 input, d=2, rank 1)."""
    base = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    routing = Routing()
    layer = MixtureLinear(
        base,
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[2.0], [0.0]]),
        torch.tensor([0]),
        torch.tensor([0.5]),
        key="l",
        block=None,
        routing=routing,
        universal=(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [-1.0]]), 1.0),
        variant="res",
    )
    routing.begin().set_weights(torch.tensor([[1.0]]))
    # x = (1, 2): W0 x = (1, 2); A_u x = 3 -> h = (3, -3); A h = 6 -> LeakyReLU 6 -> 0.5 * B * 6 = (6, 0)
    assert torch.allclose(layer(torch.tensor([[1.0, 2.0]])), torch.tensor([[1 + 3 + 6, 2 - 3 + 0.0]]))
    # x = (2, -1): h = (1, -1); A h = 2 -> (2, 0); y = (2, -1) + (1, -1) + (2, 0)
    assert torch.allclose(layer(torch.tensor([[2.0, -1.0]])), torch.tensor([[5.0, -2.0]]))
    # x = (-1, 0): h = (-1, 1); A h = -2 -> LeakyReLU -0.02 -> 0.5 * 2 * -0.02 = -0.02
    assert torch.allclose(layer(torch.tensor([[-1.0, 0.0]])), torch.tensor([[-1 - 1 - 0.02, 0 + 1 + 0.0]]))


def test_delta_weight_equals_forward():
    layer, routing, A, B = make_layer()
    w = torch.tensor([0.3, -1.0, 2.0])
    x = torch.randn(5, 10)
    routing.call.set_weights(w.expand(5, -1))
    merged = layer.base_layer(x) + x @ layer.delta_weight(w).T
    assert_close(layer(x), merged, atol=1e-4)


@pytest.mark.parametrize("seq, per_row", [(12, True), (1, False)])
def test_per_row_path_equals_union_path(seq, per_row, monkeypatch):
    """Rows with different top-2 experts: on prompts each row gathers its own experts
    (Punica-style), on decoding steps the batch's union runs; both equal the dense formula."""
    from loramix.layers import PER_ROW_MIN_TOKENS, MixtureLinear

    assert (seq >= PER_ROW_MIN_TOKENS) == per_row
    calls = []
    original = MixtureLinear._per_row
    monkeypatch.setattr(MixtureLinear, "_per_row", lambda self, *a: calls.append(1) or original(self, *a))
    layer, routing, A, B = make_layer(ranks=(2, 3, 4, 2))
    x = torch.randn(4, seq, 10)
    w = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.4, 0.6, 0.0], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    routing.call.set_weights(w)
    assert routing.call.row_experts is not None and routing.call.row_experts.shape == (4, 2)
    want = layer.base_layer(x) + sum(w[:, i, None, None] * expert_out(layer, A, B, i, x) for i in range(4))
    assert_close(layer(x), want, atol=1e-4)
    assert bool(calls) == per_row
    routing.call.set_weights(torch.full((4, 4), 0.25))  # every row uses every expert: concatenated path
    assert routing.call.row_experts is None


def test_bf16_activations_compute_in_bf16_with_float32_experts():
    """A bf16 base keeps float32 experts (saved losslessly) but computes them in bf16: both
    paths stay within bf16 rounding of the float32 result, and the cast is cached per dtype."""
    layer, routing, A, B = make_layer(ranks=(2, 3, 4, 2))
    x = torch.randn(4, 12, 10)
    w = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.4, 0.6, 0.0], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    routing.call.set_weights(w)
    want = layer(x)
    layer.base_layer.to(torch.bfloat16)
    for seq in (12, 1):  # per-row path, then the union path of decoding steps
        routing.call.set_weights(w)
        got = layer(x[:, :seq].bfloat16())
        assert got.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
        assert_close(got.float(), want[:, :seq], atol=0.1 * want.abs().max().item())
    assert ("lora_A", torch.bfloat16) in layer._casts


def test_cached_casts_follow_in_place_changes():
    layer, routing, A, B = make_layer()
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 2, 10).bfloat16()
    routing.call.set_weights(torch.full((3, 3), 1 / 3))
    before = layer(x) - layer.base_layer(x)
    with torch.no_grad():
        layer.lora_B.mul_(2.0)  # e.g. load_state_dict into a mixture that already ran
    routing.call.set_weights(torch.full((3, 3), 1 / 3))
    after = layer(x) - layer.base_layer(x)
    assert_close(after.float(), 2 * before.float(), atol=0.05 * before.abs().max().item())


def test_all_ranks_path_shares_rank_gates_and_equals_dense(monkeypatch):
    """The GPU path runs every expert's ranks with zero gates for unused ones (no slicing, no
    per-row gathers) and computes the rank gates once for all layers of the same layout."""
    monkeypatch.setattr(MixtureLinear, "_runs_all_ranks", lambda self, x: True)
    monkeypatch.setattr(MixtureLinear, "_per_row", lambda *a: pytest.fail("per-row path taken"))
    layer, routing, A, B = make_layer(ranks=(2, 3, 4, 2))
    twin, _, A2, B2 = make_layer(ranks=(2, 3, 4, 2), seed=1)
    object.__setattr__(twin, "routing", routing)
    x = torch.randn(4, 12, 10)
    w = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.4, 0.6, 0.0], [0.0, 0.0, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    routing.call.set_weights(w)
    for lay, a, b in ((layer, A, B), (twin, A2, B2)):
        want = lay.base_layer(x) + sum(w[:, i, None, None] * expert_out(lay, a, b, i, x) for i in range(4))
        assert_close(lay(x), want, atol=1e-4)
    assert sum(1 for k in routing.call.prepared if k[0] == "gates") == 1
    assert routing.call.prepared[(id(layer), 4, torch.float32)][0].shape[0] == 11  # all ranks, none sliced


def test_gate_gradients_through_in_place_accumulation():
    """Expert outputs are added into the base output in place; gradients to the gates (what a
    router trains on) and to the input must equal the dense formula's."""
    layer, routing, A, B = make_layer()
    x = torch.randn(2, 6, 10, requires_grad=True)
    gates = torch.rand(2, 6, 3, requires_grad=True)

    class Fixed:
        def layer_gates(self, routing, layer, x):
            return gates

    routing.router = Fixed()
    layer(x).pow(2).sum().backward()
    got = gates.grad.clone(), x.grad.clone()
    gates.grad = x.grad = None
    want = layer.base_layer(x) + sum(gates[..., i : i + 1] * expert_out(layer, A, B, i, x) for i in range(3))
    want.pow(2).sum().backward()
    assert_close(got[0], gates.grad, atol=1e-3)
    assert_close(got[1], x.grad, atol=1e-3)


def test_gpu_path_shares_sibling_shrinks_and_accumulates_the_base_last(adapters, monkeypatch):
    """On the GPU path q/k/v (and gate/up) run their experts' shrinks as one GEMM, and the base
    GEMM adds itself to the expert output (beta = 1): same logits as the CPU path, 3 fewer
    linears per block, and no adapted base layer called on its own."""
    from helpers import logits
    from tiny import batch, tiny_llama

    from loramix import MixtureModel, layers

    mm = MixtureModel.from_adapters(tiny_llama(0), adapters, router=None)
    groups = {id(layer.siblings): key for key, layer in mm.layers.items() if layer.siblings is not None}
    assert len(groups) == 4  # q/k/v and gate/up in each of the 2 blocks
    ids, mask = batch()
    w = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.5, 0.0, 0.5]])
    want = logits(mm, ids, mask, expert_weights=w)
    linear, base_calls = torch.nn.functional.linear, []

    def counted(x, weight, bias=None):
        counted.n += 1
        return linear(x, weight, bias)

    def run(share, first):
        monkeypatch.setattr(layers, "GPU_SHARED_SHRINK", share)
        monkeypatch.setattr(layers, "GPU_LORA_FIRST", first)
        counted.n = 0
        base_calls.clear()
        with monkeypatch.context() as m:
            m.setattr(torch.nn.functional, "linear", counted)
            got = logits(mm, ids, mask, expert_weights=w)
        return got, counted.n, len(base_calls)

    monkeypatch.setattr(MixtureLinear, "_runs_all_ranks", lambda self, x: True)
    for layer in mm.layers.values():
        layer.base_layer.register_forward_hook(lambda *a: base_calls.append(1))
    plain, shared, first = run(False, False), run(True, False), run(True, True)
    for got, _, _ in (plain, shared, first):
        assert_close(got, want, atol=1e-5)
    assert plain[1] - shared[1] == 2 * (2 + 1)  # per block: q/k/v 3 -> 1, gate/up 2 -> 1
    assert plain[2] == shared[2] == len(mm.layers) and first[2] == 0


def test_siblings_fed_different_inputs_fall_back_to_their_own_shrinks(caplog):
    from loramix.layers import SharedShrink

    a, routing, A1, B1 = make_layer(seed=0)
    b, _, A2, B2 = make_layer(seed=1)
    object.__setattr__(b, "routing", routing)
    group = SharedShrink([a, b])
    a.siblings = b.siblings = group
    routing.call.set_weights(torch.tensor([[0.2, 0.3, 0.5]]))
    x = torch.randn(1, 5, 10)
    call = routing.call
    t_a = group.shrink(a, x, call, a.lora_A)
    assert_close(group.shrink(b, x, call, b.lora_A), x @ b.lora_A.T)  # same tensor: b's columns
    assert_close(t_a, x @ a.lora_A.T)
    assert not [k for k in call.prepared if k[0] == "shrink"]  # the last sibling dropped the shared shrink
    group.shrink(a, x, call, a.lora_A)
    y = x.clone()  # a model that feeds b its own tensor
    assert_close(group.shrink(b, y, call, b.lora_A), y @ b.lora_A.T)
    assert group.broken and "different inputs" in caplog.text
