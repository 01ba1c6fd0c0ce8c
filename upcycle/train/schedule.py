"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

    lr(s) = lr · s / W                                    for s ≤ W   (s = 1, 2, ... the step taken)
    lr(s) = floor + (lr − floor) · ½(1 + cos(π · p))      p = min(1, (s − W) / (D − W))

with W warm-up steps, D the decay horizon and floor = min_lr_ratio · lr. Step 1 already has a
non-zero rate (lr/W), so no step is wasted at lr 0.

The schedule is a pure function of the step, so its checkpoint state is the step alone; the
trainer writes the rate into the optimiser's param groups before every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    lr: float
    warmup_steps: int
    decay_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        """The learning rate of step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        floor = self.min_lr_ratio * self.lr
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict:
        return {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }
