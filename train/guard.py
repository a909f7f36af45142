"""Anomaly detection for `run.on_anomaly`: which logged step is bad, and why, in words.

A pure function of the values the engine already logs, so every rank (given the same reduced
values) reaches the same verdict without talking to the others.
"""

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass
class GuardConfig:
    on_anomaly: str = "stop"  # stop | rollback (reload the last good checkpoint, skip the data window, go on)
    max_rollbacks: int = 3  # rollbacks after which the run stops
    spike_factor: float = 0.0  # > 0: a logged loss above factor x the running median is a spike
    spike_window: int = 20  # logged values in the running median
    min_rankme: float = 0.0  # > 0: monitor/rankme below this is collapse
    min_teacher_entropy: float = -1.0  # >= 0: train/teacher_entropy below this is collapse (DINO)
    rollback_lr_scale: float = 1.0  # multiply the lr by this after each rollback


class AnomalyDetector:
    """Feed it each logged row; it returns the reason a row is anomalous, or None."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)

    def check(self, row: dict[str, float]) -> str | None:
        loss = row.get("train/loss")
        if loss is not None and not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        c = self.cfg
        if loss is not None and c.spike_factor > 0 and len(self.losses) == self.losses.maxlen:
            median = statistics.median(self.losses)
            if loss > c.spike_factor * median:
                return f"loss spike: {loss:.4g} > {c.spike_factor:g} x running median {median:.4g}"
        rank = row.get("monitor/rankme")
        if rank is not None and c.min_rankme > 0 and rank < c.min_rankme:
            return f"collapse: effective rank {rank:.3g} < run.min_rankme={c.min_rankme:g}"
        entropy = row.get("train/teacher_entropy")
        if entropy is not None and c.min_teacher_entropy >= 0 and entropy < c.min_teacher_entropy:
            return f"collapse: teacher entropy {entropy:.3g} < run.min_teacher_entropy={c.min_teacher_entropy:g}"
        if loss is not None:
            self.losses.append(loss)
        return None

    def reset(self) -> None:
        """After a rollback the history before the bad window is the right baseline again; start afresh."""
        self.losses.clear()
