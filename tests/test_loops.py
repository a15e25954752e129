"""Training loops: golden losses (seeded, 4 steps), metric keys, only trainable params change."""

import copy
import io

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


def test_lora_plus_trains_the_b_matrices_as_pefts_loraplus_optimizer_does():
    """`lora_plus_ratio`: the same parameter groups and learning rates as PEFT's
    `create_loraplus_optimizer`, hence the same step; 1 keeps one group (plain LoRA)."""
    from peft import get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    from loramix.trainees import lora_config

    cfg = ExpertConfig(rank=4, lr=1e-2, lora_plus_ratio=4.0, warmup_ratio=0.0)  # the schedule starts at `lr`
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), lora_config(cfg))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()  # PEFT starts B at 0: make A's gradient non-zero too
    twin = copy.deepcopy(model)
    ours = TorchStepper(model.named_parameters(), cfg).optimizer
    peft = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=4.0, weight_decay=0.0)

    def lrs(optimizer, m):
        by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        return {n: by_param[id(p)] for n, p in m.named_parameters() if p.requires_grad}

    assert lrs(ours, model) == lrs(peft, twin)
    assert {lr for n, lr in lrs(ours, model).items() if "lora_B" in n} == {4e-2}
    batch = next(iter(batches(toy_examples(), 4, 0, steps=1)))
    for m, optimizer in ((model, ours), (twin, peft)):
        lm_loss(m, batch)[0].backward()
        optimizer.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
    plain = TorchStepper(model.named_parameters(), cfg.model_copy(update={"lora_plus_ratio": 1.0}))
    assert len(plain.optimizer.param_groups) == 1


def test_warmup_then_cosine():
    f = warmup_cosine(RouterConfig(steps=100, warmup_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing to train"):
        TorchStepper(tiny_llama(0).requires_grad_(False).named_parameters(), RouterConfig())


def test_run_steps_reports_every_step():
    model = tiny_llama(0)
    stepper = TorchStepper(model.named_parameters(), RouterConfig(steps=2, lr=1e-3))
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
    from loramix.validation import Validation

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


class ScriptedValidation:
    """A toy model, its batches and a scripted validation curve for :func:`run_steps`."""

    def __init__(self, curve, *, steps=20, cooldown=5, lr=0.1):
        from loramix.validation import Validation, snapshot_trainable

        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1)
        self.stepper = TorchStepper(self.model.named_parameters(), ExpertConfig(steps=steps, lr=lr, warmup_ratio=0.0))
        self.check = Validation(iter(curve).__next__, every=1, patience=2, takeoff=1.0, cooldown=cooldown)
        self.check.snapshot, self.check.restore = snapshot_trainable(self.model)
        self.after, self.before = {}, []  # weights after each step; weights each step started from
        self.metrics = []

    def weights(self):
        return torch.cat([p.detach().flatten() for p in self.model.parameters()]).clone()

    def run(self, n, *, start=0, max_steps=20):
        x = torch.ones(1, 2)

        def loss_fn(model, batch):
            self.before.append(self.weights())
            return model(x).sum(), {}

        return run_steps(
            self.model,
            [{"attention_mask": torch.ones(1, 1)}] * n,
            loss_fn,
            self.stepper,
            report=lambda m, c: self.metrics.append(m),
            start_step=start,
            max_steps=max_steps,
            validation=self.check,
            on_step=lambda step: self.after.__setitem__(step, self.weights()),
        )


# best 0.5 at step 2, two validations without an improvement: early stopping at step 4; then a
# cooldown whose step 7 beats the best.
CURVE = [1.0, 0.5, 0.6, 0.7, 0.9, 0.8, 0.45, 0.55, 0.6]


def test_early_stopping_cools_down_from_the_best_weights():
    """Patience out at step 4: the weights go back to step 2's (the best), the learning rate falls
    linearly to 0 over `cooldown` = 5 more steps, and the weights of the lowest validation loss
    (step 7, inside the cooldown) are the ones kept."""
    run = ScriptedValidation(CURVE)
    out = run.run(20)
    assert out["steps"] == 9 and out["stopped"] == "early" and out["cooldown_from"] == 4
    assert out["best_step"] == 7 and [s for s, _ in out["val_losses"]] == list(range(1, 10))
    torch.testing.assert_close(run.before[4], run.after[2])  # step 5 started from the best weights
    lr = {m["step"]: m["lr"] for m in run.metrics}
    assert lr[4] == pytest.approx(0.1 * warmup_cosine(ExpertConfig(steps=20, warmup_ratio=0.0))(4))
    assert [lr[s] / lr[4] for s in range(5, 10)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    torch.testing.assert_close(run.weights(), run.after[7])
    assert not out["still_improving"]  # stopped early: no under-trained warning


def test_a_cooldown_never_runs_past_the_step_budget():
    run = ScriptedValidation(CURVE)
    out = run.run(6, max_steps=6)
    assert out["steps"] == 6 and out["stopped"] == "early" and out["cooldown_from"] == 4
    run = ScriptedValidation(CURVE, cooldown=0)
    out = run.run(20)
    assert out["steps"] == 4 and out["cooldown_from"] is None and out["best_step"] == 2
    torch.testing.assert_close(run.weights(), run.after[2])


def test_a_run_resumed_inside_its_cooldown_gets_the_same_learning_rates(tmp_path):
    """The worker checkpoints mid-cooldown and a relaunch resumes: the saved validation state
    re-applies the same annealing, so steps 7-9 run at the uninterrupted run's rates."""
    whole = ScriptedValidation(CURVE)
    whole.run(20)
    first = ScriptedValidation(CURVE)
    first.run(6)
    first.check.save(tmp_path)
    again = ScriptedValidation(CURVE[6:])
    again.check.load(tmp_path)
    again.model.load_state_dict(first.model.state_dict())
    again.stepper.optimizer.load_state_dict(first.stepper.optimizer.state_dict())
    again.stepper.scheduler.load_state_dict(first.stepper.scheduler.state_dict())  # what DeepSpeed restores
    out = again.run(14, start=6)
    assert out["steps"] == 9 and out["cooldown_from"] == 4 and out["stopped"] == "early"
    assert [m["lr"] for m in again.metrics] == pytest.approx([m["lr"] for m in whole.metrics[6:]])


# As CURVE to the stop at step 4, but the cooldown (steps 5-9) ends still falling (0.3 -> 0.25) and
# above LEARNED_LOSS: training goes on; patience counts afresh from step 10 and runs out at step 12;
# the second cooldown (13-17) ends flat.
FALLING = [1.0, 0.5, 0.6, 0.7, 0.45, 0.4, 0.35, 0.3, 0.25, 0.3, 0.31, 0.32, 0.28, 0.27, 0.26, 0.26, 0.26]


def test_a_cooldown_that_ends_still_falling_trains_on():
    """The stop at step 4 was on a bump: its cooldown's loss fell 17% in its last step. The learning
    rate comes back to the schedule (over `cooldown` = 5 steps), patience counts afresh, and the next
    stop cools down and ends; the lowest loss's weights (step 9) are kept."""
    run = ScriptedValidation(FALLING, steps=30)
    out = run.run(30, max_steps=30)
    assert out["rewarmed_at"] == [9] and out["cooldown_from"] == 12 and out["steps"] == 17
    assert out["stopped"] == "early" and out["best_step"] == 9
    lr = {m["step"]: m["lr"] for m in run.metrics}
    schedule = warmup_cosine(ExpertConfig(steps=30, warmup_ratio=0.0))
    assert lr[9] == 0.0  # the cooldown's end; back over `cooldown` = 5 steps to the schedule
    assert [lr[s] for s in (10, 11, 12)] == pytest.approx([0.1 * schedule(s) * (s - 9) / 5 for s in (10, 11, 12)])
    assert [lr[s] / lr[12] for s in range(13, 18)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    torch.testing.assert_close(run.weights(), run.after[9])


def test_a_cooldown_ends_training_when_its_loss_is_learned_or_flat():
    """Still falling but under LEARNED_LOSS (nothing left to learn), flat, or a cooldown with one
    validation (nothing in it to compare with; the stop's own is at the peak learning rate): training ends."""
    learned = ScriptedValidation([x * 0.1 for x in FALLING])
    assert learned.run(30, max_steps=30)["steps"] == 9
    flat = ScriptedValidation(FALLING[:8] + [0.29])  # 0.3 -> 0.29: -3%
    out = flat.run(30, max_steps=30)
    assert out["steps"] == 9 and out["rewarmed_at"] == [] and out["best_step"] == 9
    short = ScriptedValidation(FALLING, steps=30, cooldown=1)  # its one validation, 0.45, against the stop's 0.7
    out = short.run(30, max_steps=30)
    assert out["steps"] == 5 and out["rewarmed_at"] == []


def test_a_run_resumed_after_training_went_on_gets_the_same_learning_rates(tmp_path):
    """Checkpointed at step 11 (after the re-warmup at 9): the relaunch replays the re-warmup and
    then the second cooldown at the uninterrupted run's rates."""
    whole = ScriptedValidation(FALLING, steps=30)
    whole.run(30, max_steps=30)
    first = ScriptedValidation(FALLING, steps=30)
    first.run(11, max_steps=30)
    first.check.save(tmp_path)
    again = ScriptedValidation(FALLING[11:], steps=30)
    again.check.load(tmp_path)
    again.model.load_state_dict(first.model.state_dict())
    again.stepper.optimizer.load_state_dict(first.stepper.optimizer.state_dict())
    saved = io.BytesIO()  # as DeepSpeed checkpoints it: pickled
    torch.save(first.stepper.scheduler.state_dict(), saved)
    again.stepper.scheduler.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=False))
    out = again.run(19, start=11, max_steps=30)
    assert out["steps"] == 17 and out["rewarmed_at"] == [9] and out["cooldown_from"] == 12
    assert [m["lr"] for m in again.metrics] == pytest.approx([m["lr"] for m in whole.metrics[11:]])


def test_a_run_checkpointed_at_its_cooldowns_last_step_stays_finished(tmp_path):
    """The stop is decided before the step's checkpoint: one written at the last step of a cooldown
    that ended training resumes to nothing more (not to a learning rate of 0 until `max_steps`)."""
    first = ScriptedValidation(FALLING[:8] + [0.29], steps=30)
    first.run(30, max_steps=30)
    first.check.save(tmp_path)
    again = ScriptedValidation([], steps=30)
    again.check.load(tmp_path)
    out = again.run(21, start=9, max_steps=30)
    assert out["steps"] == 9 and again.metrics == [] and out["stopped"] == "early"


def test_the_best_weights_are_the_lowest_loss_while_patience_counts_real_improvements():
    """A loss that creeps down by less than 1% is no improvement for patience (training stops), but
    the lowest loss's weights are still the ones kept (as HF's load_best_model_at_end)."""
    run = ScriptedValidation([1.0, 0.5, 0.4999, 0.4998], cooldown=0)
    out = run.run(20)
    assert out["steps"] == 4 and out["best_step"] == 4
