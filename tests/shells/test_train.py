"""One LoRA trainer: ZeRO-3 gathers before saving; a killed worker is retried and resumes."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramix import plan, stages

from .conftest import small_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TIED_HEAD = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = small_config(root / "data", root / "out")
    base = stages.base_stage(cfg, root / "out" / "base")
    return cfg, root, base


def fit(cfg, root, base, name, progress=None, expert=None, **over):
    """The `expert/reverse` stage of the plan, trained by `fit_lora` as `loramix run` does."""
    from actors.lora_trainer import fit_lora

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=over)})
    if expert:
        cfg = cfg.model_copy(update={"expert": cfg.expert.model_copy(update=expert)})
    stage = next(s for s in plan.build_plan(cfg) if s.name == "expert/reverse")
    spec = stages.lora_spec(plan.Context.create(cfg), stage, {"base": base})
    spec.out_dir = str(root / "out" / name)
    summary = fit_lora(spec, cfg, base, name, progress)
    fit.spec = spec
    return summary, load_file(str(Path(spec.out_dir) / "adapter_model.safetensors"))


def test_zero3_saves_full_gathered_weights_equal_to_zero0(world):
    """With LoRA+ (two parameter groups, which ZeRO partitions apart) and without."""
    cfg, root, base = world
    lora_plus = {"lora_plus_ratio": 4.0}
    _, w0 = fit(cfg, root, base, "z0", zero_stage=0, expert=lora_plus)
    s3, w3 = fit(cfg, root, base, "z3", zero_stage=3, expert=lora_plus)
    assert s3.zero_stage == 3 and set(w0) == set(w3)
    for key in w0:
        assert w3[key].shape == w0[key].shape and w3[key].numel() > 0, key  # not an empty ZeRO-3 shard
        torch.testing.assert_close(w3[key], w0[key], rtol=1e-4, atol=1e-5)
    assert any(k.endswith("lora_B.weight") and w0[k].abs().sum() > 0 for k in w0)  # it trained


def test_killed_worker_is_retried_and_resumes_from_checkpoint(world):
    import ray

    from actors.progress import ProgressActor

    cfg, root, base = world
    progress = ProgressActor.remote()
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            snap = ray.get(progress.snapshot.remote())
            if snap["jobs"].get("expert/reverse", (0,))[0] >= 5:  # past the first checkpoints (every 2 steps)
                pid = snap["pids"]["expert/reverse"][0]
                os.kill(pid, signal.SIGKILL)
                killed["pid"] = pid
            time.sleep(0.1)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # validation every 4 steps with no patience limit: the resumed run keeps the validation history
    summary, weights = fit(
        cfg,
        root,
        base,
        "killme",
        progress=progress,
        max_failures=2,
        expert={"steps": 24, "eval_every": 4, "patience": 100},
    )
    thread.join(timeout=1)
    assert killed, "the worker finished before it could be killed; the test proved nothing"
    assert summary.resumed_from >= 2 and summary.steps == 24
    assert [s for s, _ in summary.val_losses] == list(range(4, 25, 4))
    # a checkpoint holds the LoRA and its optimizer state, not a copy of the frozen base
    states = list((root / "out" / "ray_storage" / "killme").rglob("*model_states.pt"))
    assert states, "no DeepSpeed checkpoint was kept"
    for f in states:
        module = torch.load(f, map_location="cpu", weights_only=False)["module"]
        # (a head tied to the embeddings is no parameter of its own: DeepSpeed cannot tell it is frozen)
        assert any("lora_" in k for k in module) and {k for k in module if "lora_" not in k} <= {TIED_HEAD}
    # nothing lost: the resumed run trained on the batches the killed one would have, to the same weights
    whole, uninterrupted = fit(cfg, root, base, "whole", expert={"steps": 24, "eval_every": 4, "patience": 100})
    assert whole.resumed_from == 0 and uninterrupted.keys() == weights.keys()
    assert max(float(w.abs().max()) for k, w in weights.items() if "lora_B" in k) > 1e-3  # far above atol: it trained
    for key in weights:
        torch.testing.assert_close(weights[key], uninterrupted[key], rtol=1e-4, atol=1e-6)
    assert [loss for _, loss in summary.val_losses] == pytest.approx([loss for _, loss in whole.val_losses], rel=1e-4)


def test_early_stopping_on_ray_keeps_the_best_weights(world):
    """`expert.steps` is a maximum: with patience 1 and a learning rate that makes the loss blow
    up, the first validation that is worse ends training after a 10-step cooldown (the DeepSpeed
    engine's schedule annealed), and the adapter written holds the lowest validation loss's weights.
    Checkpoints every 5 steps: DeepSpeed pickles the annealed scheduler's state with them."""
    cfg, root, base = world
    from peft import PeftModel

    over = {"steps": 60, "eval_every": 5, "patience": 1, "takeoff": 1.0, "lr": 0.5, "cooldown": 10}  # patience alone
    summary, _ = fit(cfg, root, base, "early", expert=over, checkpoint_every=5)
    assert summary.stopped == "early" and summary.cooldown_from is not None
    assert summary.steps == min(summary.cooldown_from + 10, 60) < 60
    val = {int(s): v for s, v in summary.val_losses}
    best = summary.best_step
    assert val[best] == min(val.values()) and max(val) == summary.steps
    # the adapter written is the best step's: its validation loss is the one recorded there
    spec = fit.spec
    model = PeftModel.from_pretrained(stages.load_base(cfg, base), spec.out_dir).eval()
    tok = stages.load_tokenizer(base)
    got = stages.val_loss_fn(model, spec.val, spec.optim.batch_size, tok.pad_token_id)()
    assert abs(got - val[best]) < 1e-3 * max(1.0, val[best]), (got, val)
