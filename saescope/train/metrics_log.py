"""Training metrics: ``metrics.jsonl`` in the run folder, a log line per SAE, and optional TensorBoard / W&B.

Every ``log_every`` steps each SAE's means over the steps since the last line (loss, MSE, L0, FVU, λ, lr) and
its dead fraction are written; under torch.distributed only rank 0 writes, the other ranks take part in the
reductions the dead fractions need.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from saescope.errors import SaescopeError
from saescope.train.config import TrainConfig


class MetricsLog:
    """Writes the trainer's metric rows (see module docstring); ``writes=False`` on the ranks that only reduce."""

    def __init__(self, config: TrainConfig, log_line: Callable[[str], None], *, writes: bool = True):
        self.config = config
        self.path = Path(config.out_dir) / "metrics.jsonl"
        self.log_line = log_line
        self.writes = writes
        self._loggers: list[tuple[str, Any]] = []

    def open(self) -> None:
        """Start the TensorBoard / W&B loggers the config asks for (a clear error when they are missing)."""
        if not self.writes:
            return
        config, out_dir = self.config, Path(self.config.out_dir)
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SaescopeError("tensorboard logging needs the tensorboard package: pip install tensorboard"
                                    ) from exc
            self._loggers.append(("tensorboard", SummaryWriter(str(out_dir / "tensorboard"))))
        if config.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise SaescopeError("Weights & Biases logging needs wandb: pip install wandb") from exc
            run = wandb.init(mode="offline", dir=str(out_dir), project="saescope",
                             config=config.model_dump(mode="json"), resume="allow",
                             id=f"saescope-{config.fingerprint()}")
            self._loggers.append(("wandb", run))

    def close(self) -> None:
        for kind, logger in self._loggers:
            if kind == "tensorboard":
                logger.close()
            else:
                logger.finish()
        self._loggers = []

    def write(self, step: int, tokens_seen: int, units: Sequence[Any], tokens_per_s: float) -> list[dict[str, Any]]:
        """One row per SAE (its :meth:`TrainingUnit.summary`), appended to ``metrics.jsonl`` and printed."""
        window = self.config.dead_window_tokens
        if not self.writes:
            return [{"step": step, "sae": unit.spec.name, **unit.summary(tokens_seen, window)} for unit in units]
        rows = []
        with open(self.path, "a") as fh:
            for unit in units:
                row = {"step": step, "tokens": tokens_seen, "sae": unit.spec.name, "tokens_per_s": tokens_per_s,
                       **unit.summary(tokens_seen, window)}
                fh.write(json.dumps(row) + "\n")
                rows.append(row)
                self.log_line(f"step {step:>7} {unit.spec.name}: loss {row['loss']:.4g} mse {row['mse']:.4g} "
                              f"L0 {row['l0']:.1f} fvu {row['fvu']:.3f} dead {row['dead_fraction']:.1%} "
                              f"λ {row.get('lambda', 0):.3g} lr {row.get('lr', 0):.3g}")
                scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
                for kind, logger in self._loggers:
                    if kind == "tensorboard":
                        for k, v in scalars.items():
                            logger.add_scalar(f"{unit.spec.name}/{k}", v, step)
                    else:
                        logger.log({f"{unit.spec.name}/{k}": v for k, v in scalars.items()}, step=step)
        return rows
