"""Training loops: plain functions over a model, batches and an optimizer stepper.

Loops never read globals or the environment. ``report(metrics, ckpt_dir | None)`` is passed in
(Ray shells pass a wrapper of ``ray.train.report``; tests pass ``lambda m, c: seen.append(m)``).
The optimizer is behind a :class:`Stepper` (``backward``, ``step``, ``lr``, ``anneal``), so the same loop
runs with a torch AdamW here and a DeepSpeed engine in ``actors/``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from loramix.config import OptimConfig
from loramix.validation import Validation, snapshot_trainable

logger = logging.getLogger(__name__)

Report = Callable[[dict, "str | None"], None]
LossFn = Callable[[nn.Module, dict], "tuple[torch.Tensor, dict]"]


class Stepper(Protocol):
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> float: ...  # returns the gradient norm before clipping
    def lr(self) -> float: ...
    def anneal(self, start: int, steps: int) -> None: ...  # see :func:`anneal`
    def rewarm(self, start: int, steps: int) -> None: ...  # see :func:`rewarm`


def accelerator() -> torch.device:
    """Where in-process stages put their model: the GPU Ray assigned this task (or the first one), else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_of(model) -> torch.device:
    """The device of a module's parameters (a wrapper with ``.model`` is looked through)."""
    for m in (model, getattr(model, "model", None)):
        if isinstance(m, nn.Module):
            for p in m.parameters():
                return p.device
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch's tensors (data loaders build them on the CPU) to ``device``."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def warmup_cosine(cfg: OptimConfig) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup_ratio * steps``, then cosine to 10%."""
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def anneal(scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, steps: int) -> None:
    """From step ``start`` on, the learning rate falls linearly from its value there to 0 over
    ``steps`` steps: the cooldown after early stopping (a warmup-stable-decay schedule's decay,
    started when the validation loss says so). A pure function of the step, so a run resumed in
    the middle of its cooldown calls it again with the same arguments and gets the same rates."""
    _schedule(scheduler)
    start_factors = [f(start) for f in scheduler.lr_lambdas]
    scheduler.lr_lambdas = [lambda k, f0=f0: f0 * max(0.0, 1 - (k - start) / steps) for f0 in start_factors]


def rewarm(scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, steps: int) -> None:
    """From step ``start`` on, back to the schedule the optimiser began with (undoing :func:`anneal`),
    reached linearly from 0 over ``steps`` steps: training goes on after a cooldown that ended with
    its validation loss still falling (:meth:`Validation.cooled`). A pure function of the step, as
    :func:`anneal` (a resumed run replays the last re-warmup, then its cooldown if one is running)."""
    scheduler.lr_lambdas = [lambda k, f=f: f(k) * min(1.0, (k - start) / steps) for f in _schedule(scheduler)]


_SCHEDULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> list:
    """The multipliers the scheduler was built with, kept the first time a cooldown replaces them
    (beside it, not on it: its ``state_dict`` pickles its attributes, and they are local functions)."""
    return _SCHEDULES.setdefault(scheduler, list(scheduler.lr_lambdas))


def adamw(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig):
    """``(AdamW, its warmup/cosine LambdaLR)`` over the trainable ``named`` parameters: the optimiser
    of every LoRA and router. A LoRA's ``lora_B`` matrices learn at ``lora_plus_ratio`` times the
    rate of the rest (LoRA+, arXiv 2402.12354: eta_B = lambda * eta_A; 1 = plain LoRA)."""
    ratio = getattr(cfg, "lora_plus_ratio", 1.0)
    rest, fast = [], []
    for name, p in named:
        if p.requires_grad:  # PEFT's `create_loraplus_optimizer` grouping: B matrices and vectors
            (fast if ratio != 1.0 and ("lora_B" in name or p.ndim == 1) else rest).append(p)
    groups = [{"params": rest}]
    if fast:  # DeepSpeed's ZeRO flattens each group: no empty one
        groups.append({"params": fast, "lr": cfg.lr * ratio})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))


class TorchStepper:
    """AdamW + warmup/cosine + global-norm clipping over ``params``."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig):
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named:
            raise ValueError("nothing to train: no parameter requires grad.")
        self.params = [p for _, p in named]
        self.cfg = cfg
        self.optimizer, self.scheduler = adamw(named, cfg)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def anneal(self, start: int, steps: int) -> None:
        anneal(self.scheduler, start, steps)

    def rewarm(self, start: int, steps: int) -> None:
        rewarm(self.scheduler, start, steps)


def run_steps(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: LossFn,
    stepper: Stepper,
    *,
    report: Report,
    log_every: int = 10,
    start_step: int = 0,
    max_steps: int | None = None,
    validation: Validation | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Optimise ``loss_fn`` over ``batches``; report ``loss, lr, tokens_per_s, grad_norm`` (+ extras).

    Args:
        max_steps: the last step (the schedule's length); with ``validation`` training may stop earlier.
        validation: early stopping on held-out rows; its steps also report ``val_loss``. With
            ``validation.cooldown``, stopping restores the best weights and anneals the learning
            rate to 0 over that many more steps (never past ``max_steps``) before it ends, unless
            the loss was still falling at its end (:meth:`Validation.cooled`): then training goes on.

    Returns:
        ``{"steps", "final_loss", "losses", "seconds"}`` (``final_loss``: mean of the last 10 steps),
        plus with ``validation``: ``stopped`` (``early`` or ``max_steps``), ``best_step``,
        ``cooldown_from`` (the step early stopping began the cooldown, or None), ``rewarmed_at`` (the
        steps training went on after a cooldown still falling),
        ``val_losses`` ``[[step, loss], ...]`` and ``still_improving``.
    """
    model.train()
    device = device_of(model)
    losses: list[float] = []
    started = time.perf_counter()
    step, stopped = start_step, "max_steps"
    cool_until = None  # the last step of a cooldown (never past max_steps)
    if validation is not None and validation.rewarmed:  # resumed after training went on past a cooldown
        stepper.rewarm(validation.rewarmed[-1], validation.cooldown)
    if validation is not None and validation.cooling is not None:  # resumed in the middle of a cooldown
        stepper.anneal(validation.cooling, validation.cooldown)
        cool_until, stopped = min(validation.cooling + validation.cooldown, max_steps or math.inf), "early"
        if start_step >= cool_until:  # checkpointed at the cooldown's last step: training had ended
            batches = ()
    for step, batch in enumerate(batches, start=start_step + 1):
        t0 = time.perf_counter()
        batch = to_device(batch, device)
        loss, extra = loss_fn(model, batch)
        stepper.backward(loss)
        grad_norm = stepper.step()
        losses.append(float(loss.detach()))
        tokens = int(batch["attention_mask"].sum())
        metrics = {
            "step": step,
            "loss": losses[-1],
            "lr": stepper.lr(),
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
            **extra,
        }
        stop = False
        if validation is not None and validation.due(step, step in (max_steps, cool_until)):
            model.eval()
            with torch.no_grad():
                stop = validation.update(step)
            model.train()
            metrics |= {"val_loss": validation.history[-1][1], "best_val_loss": validation.best[1]}
        # Decided before on_step, so a checkpoint written there resumes on the same path.
        if stop:
            stopped = "early"
            if validation.cooldown and step != max_steps:
                validation.finish(step)  # back to the best weights, then a decaying learning rate
                validation.cooling, cool_until = step, min(step + validation.cooldown, max_steps or math.inf)
                stepper.anneal(step, validation.cooldown)
            best_step, best_loss = validation.best
            then = "stopping" if cool_until is None else f"cooling down until step {cool_until}"
            logger.info(
                "step %d: validation loss stopped improving (best %.4f at step %d); %s",
                step,
                best_loss,
                best_step,
                then,
            )
        elif step == cool_until and step != max_steps and validation.cooled(step):
            stepper.rewarm(step, validation.cooldown)
            cool_until, stopped = None, "max_steps"
            logger.info("step %d: the validation loss was still falling when the cooldown ended; training on", step)
        if step % log_every == 0 or step == start_step + 1:
            logger.info(
                "step %d | loss %.4f | lr %.2e | %.0f tok/s", step, losses[-1], metrics["lr"], metrics["tokens_per_s"]
            )
        report(metrics, None)
        if on_step is not None:
            on_step(step)
        if step == cool_until or (stop and cool_until is None):
            break
    model.eval()
    tail = losses[-10:]
    summary = {
        "steps": step,
        "final_loss": sum(tail) / max(len(tail), 1),
        "losses": losses,
        "seconds": time.perf_counter() - started,
    }
    if validation is not None:
        validation.finish(step)
        summary |= {
            "stopped": stopped,
            "best_step": validation.best[0] if validation.best else None,
            "cooldown_from": validation.cooling,
            "rewarmed_at": list(validation.rewarmed),
            "val_losses": [list(h) for h in validation.history],
            "still_improving": validation.still_improving,
        }
    return summary


def lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Causal LM loss on the completion tokens (plain model, PEFT model, or mixture)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, {}


def train_expert(
    cfg,
    base_model: nn.Module,
    batches: Iterable[dict],
    *,
    report: Report,
    trunk: str | None = None,
    validation: Callable[[nn.Module], Validation] | None = None,
    stepper_factory: Callable[[nn.Module], Stepper] | None = None,
    log_every: int = 10,
):
    """Train one LoRA on ``base_model`` (modified in place; pass a copy to keep it).

    Args:
        cfg: an :class:`~loramix.config.ExpertConfig` (rank, alpha, targets, optimiser; ``steps`` is the maximum).
        trunk: a MoDULA-Res universal LoRA directory: train a Res expert on top of it, frozen.
        validation: ``model -> Validation`` for early stopping (snapshots default to the model's LoRA).
        stepper_factory: builds the optimizer stepper from the model (DeepSpeed in shells).

    Returns:
        ``(model, summary)``; :func:`loramix.trainees.save_trainee` writes the trained adapter.
    """
    from loramix.trainees import build_trainee, trainable_parameters  # trainees -> model -> loops would cycle

    model = build_trainee(base_model, cfg, trunk=trunk)
    n_train = trainable_parameters(model)
    logger.info("LoRA: %s trainable parameters (rank %d)", f"{n_train:,}", cfg.rank)
    check = validation(model) if validation is not None else None
    if check is not None and check.snapshot is None:
        check.snapshot, check.restore = snapshot_trainable(model)
    stepper = stepper_factory(model) if stepper_factory else TorchStepper(model.named_parameters(), cfg)
    summary = run_steps(
        model, batches, lm_loss, stepper, report=report, log_every=log_every, max_steps=cfg.steps, validation=check
    )
    return model, summary | {"trainable_params": n_train}
