"""Training loops: golden losses (seeded, 4 steps), metric keys, only trainable params change."""

import copy

import pytest
import torch
from tiny import tiny_llama

from loramix.config import ExpertConfig, RouterConfig
from loramix.data import Example, batches
from loramix.loops import TorchStepper, lm_loss, run_steps, train_expert, warmup_cosine

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}


def toy_examples(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (8,), generator=g).tolist()
        out.append(Example(ids, [-100] * 4 + ids[4:], i % 2, 4))
    return out


# Update only in a commit that says why (e.g. a deliberate change of init or schedule).
EXPECTED_EXPERT = [4.9122586, 4.8635159, 4.8287053, 4.9043851]


def test_golden_expert_losses():
    torch.manual_seed(0)
    cfg = ExpertConfig(rank=4, alpha=8, steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0)
    seen = []
    model, summary = train_expert(
        cfg, tiny_llama(0), batches(toy_examples(), 4, 0, steps=4), report=lambda m, c: seen.append(m)
    )
    torch.testing.assert_close(summary["losses"], EXPECTED_EXPERT, rtol=1e-5, atol=1e-5)
    assert [m["step"] for m in seen] == [1, 2, 3, 4] and all(METRIC_KEYS <= set(m) for m in seen)
    assert summary["steps"] == 4


def test_only_lora_parameters_change():
    torch.manual_seed(0)
    base = tiny_llama(0)
    before = copy.deepcopy(base.state_dict())
    cfg = ExpertConfig(rank=4, steps=3, batch_size=4, lr=1e-2)
    model, _ = train_expert(cfg, base, batches(toy_examples(), 4, 0, steps=3), report=lambda m, c: None)
    changed = {n for n, p in model.named_parameters() if "lora_" in n}
    assert changed
    for name, value in model.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in before:
            assert torch.equal(value, before[key]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


def test_warmup_then_cosine():
    f = warmup_cosine(RouterConfig(steps=100, warmup_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        TorchStepper(tiny_llama(0).requires_grad_(False).parameters(), RouterConfig())


def test_run_steps_reports_every_step():
    model = tiny_llama(0)
    stepper = TorchStepper(model.parameters(), RouterConfig(steps=2, lr=1e-3))
    seen = []
    out = run_steps(
        model, batches(toy_examples(), 4, 0, steps=2), lm_loss, stepper, report=lambda m, c: seen.append((m, c))
    )
    assert (
        len(seen) == 2
        and all(c is None for _, c in seen)
        and out["final_loss"] == pytest.approx(sum(out["losses"]) / 2)
    )


def test_early_stopping_waits_for_the_loss_to_take_off():
    """Patience counts only once the validation loss fell below `takeoff` x its first value: a loss
    flat from the start (measured on an expert whose answers need tokens the base never produced)
    is trained through; after the take-off a plateau ends training as before."""
    from loramix.loops import Validation

    curve = [3.0, 2.99, 2.99, 2.99, 2.99, 2.0, 1.2, 0.5, 0.5, 0.5, 0.5]

    def stop_step(**kw):
        losses = iter(curve)
        check = Validation(lambda: next(losses), every=1, patience=2, **kw)
        return next((i for i in range(len(curve)) if check.update(i)), None)

    assert stop_step(takeoff=1.0) == 2  # patience alone: stopped on the initial plateau
    assert stop_step() == 9  # took off at 1.2 <= 0.5 x 3.0; stopped two flat validations after 0.5
    assert stop_step(takeoff=0.1) is None  # never took off: trains to the step budget
    curve = [2.78, 2.79, 2.94, 2.9, 2.85]
    assert stop_step() is None  # a noisy plateau (measured on `upper` with an LM-head LoRA) trains on
    curve = [3.0, 2.99, 6.5, 7.0, 1.0]
    assert stop_step() == 2  # but a loss far above where it started is divergence: patience counts
    curve = [0.05, 0.049, 0.049, 0.049, 0.049]
    assert stop_step() == 2  # learned before its first validation: nothing to take off from
