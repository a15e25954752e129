"""The `tune` section of the schema: which space `loramix tune` searches and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loramix.section import Section


class TuneConfig(Section):
    space: str = "rank_topk"
    """Search space: a module of `tune_spaces/` (`loramix tune --list-spaces` shows them)."""
    num_samples: int = Field(1, ge=1)
    """Samples drawn from the space; a grid is run whole this many times (1 suits grids, 20+ sampled spaces)."""
    max_concurrent_trials: int = Field(2, ge=1)
    """Trials running at once (each also launches its experts' trainers when they are new)."""
    searcher: Literal["random", "optuna"] = "random"
    """`random` (Tune's variant generator, grids expanded) or `optuna` (TPE; no grid_search)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """`asha` stops weak trials early at validation rungs; `fifo` runs every trial to the end."""
    evals_per_trial: int = Field(4, ge=1)
    """Validation points during each trial's router training (ASHA's rungs)."""
    grace_period: int = Field(1, ge=1)
    """Validation points every trial gets before ASHA may stop it."""
    reduction_factor: int = Field(2, ge=2)
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""
    cpus_per_trial: float = Field(0.5, ge=0)
    """CPUs of a trial process (router training + validation; it mostly waits); expert trainers reserve their own."""
    gpus_per_trial: float = Field(0.0, ge=0)
    """GPUs of a trial process."""

    @model_validator(mode="after")
    def _rungs(self) -> TuneConfig:
        if self.grace_period > self.evals_per_trial:
            raise ValueError(
                f"`tune.grace_period` ({self.grace_period}) exceeds `tune.evals_per_trial` ({self.evals_per_trial}); "
                "lower grace_period or validate more often."
            )
        return self
