"""Training room: one trainer for dense, MoE and BAM models, alone or under torchrun with FSDP2.

Public API (everything else is an implementation detail):

- `TrainConfig` and its sections: what to train, on which data, how long (config.py);
- `train(config, resume=False) -> TrainResult`, and the `Trainer` class it runs (trainer.py);
- `TrainStep`, `StepResult`: one optimiser step over micro-batches, used by the trainer and by
  bench/train_step.py (step.py);
- `NonFiniteLossError`: a non-finite loss or gradient norm stopped the run (exit code 3);
- `WarmupCosine`: the learning-rate schedule (schedule.py);
- `complete_checkpoints(dir)`: the resumable checkpoints of a run (checkpointing.py).

Layout of a run's output folder: `train_config.yaml` (the config as run), `metrics.jsonl`,
`checkpoints/step-NNNNNNNN/` (resumable), `final/` (the trained model, native format),
`tensorboard/` (when tensorboard is installed).
"""

from upcycle.train.checkpointing import complete_checkpoints
from upcycle.train.config import TrainConfig
from upcycle.train.schedule import WarmupCosine
from upcycle.train.step import NonFiniteLossError, StepResult, TrainStep
from upcycle.train.trainer import Trainer, TrainResult, train

__all__ = [
    "NonFiniteLossError",
    "StepResult",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "Trainer",
    "WarmupCosine",
    "complete_checkpoints",
    "train",
]
