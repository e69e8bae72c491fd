"""Learning-rate schedules in iterations: warmup, then a multi-step decay (Sec. 4.2)."""

from __future__ import annotations

import bisect

ERROR_WINDOW = 20  # iterations averaged for the error-triggered warmup


class LRSchedule:
    """lr(i) = base lr * lr_decay ** (milestones <= i), after an optional warmup.

    Warmup is either a fixed number of iterations (constant `warmup_lr`, or linear from
    `warmup_lr` to the base lr), or, with `warmup_until_error`, the paper's ResNet-110 rule:
    hold `warmup_lr` until the mean training error of the last 20 iterations falls below the
    threshold (`warmup_iterations`, when positive, bounds it). The rule needs the training
    error, so the trainer calls `observe` while `needs_error` is true; its state is a small dict.
    """

    def __init__(self, config):
        self.base_lr = config.lr
        self.milestones = list(config.milestones)
        self.decay = config.lr_decay
        self.warmup_iterations = config.warmup_iterations
        self.warmup_lr = config.warmup_start_lr
        self.linear = config.warmup_mode == "linear"
        self.until_error = config.warmup_until_error
        self.recent_errors: list[float] = []
        self.warmup_ended_at: int | None = None

    @property
    def needs_error(self) -> bool:
        return self.until_error is not None and self.warmup_ended_at is None

    def observe(self, iteration: int, error: float) -> None:
        """Record iteration `iteration`'s training error (a fraction)."""
        if not self.needs_error:
            return
        self.recent_errors = (self.recent_errors + [error])[-ERROR_WINDOW:]
        bound_hit = 0 < self.warmup_iterations <= iteration + 1
        mean = sum(self.recent_errors) / len(self.recent_errors)
        if bound_hit or (len(self.recent_errors) == ERROR_WINDOW and mean < self.until_error):
            self.warmup_ended_at = iteration + 1

    def in_warmup(self, iteration: int) -> bool:
        if self.until_error is not None:
            return self.warmup_ended_at is None or iteration < self.warmup_ended_at
        return iteration < self.warmup_iterations

    def lr_at(self, iteration: int) -> float:
        if self.in_warmup(iteration):
            if self.linear and self.warmup_iterations:
                frac = iteration / self.warmup_iterations
                return self.warmup_lr + (self.base_lr - self.warmup_lr) * frac
            return self.warmup_lr
        return self.base_lr * self.decay ** bisect.bisect_right(self.milestones, iteration)

    def state_dict(self) -> dict:
        return {"recent_errors": list(self.recent_errors), "warmup_ended_at": self.warmup_ended_at}

    def load_state_dict(self, state: dict) -> None:
        self.recent_errors = list(state["recent_errors"])
        self.warmup_ended_at = state["warmup_ended_at"]
