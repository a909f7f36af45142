"""Training anomalies (a non-finite loss, DeepSpeed skipping steps in a row, a loss spike, a collapse) and what
`run.on_anomaly` does with them: `stop` the run with one line, or `rollback` to the last good checkpoint.

A rollback reloads that checkpoint's weights, optimizer state and RNG, and so its step (the lr schedule and
every step-driven schedule follow it), but not its data position: the streams go on past the window that led
to the anomaly instead of replaying it. Every anomaly is one warning line and an `anomaly/*` row in
TensorBoard and metrics.jsonl.
"""

import logging
import statistics
from collections import deque

from train import checkpoint

log = logging.getLogger("train")


class Anomaly(FloatingPointError):
    """An anomaly at `step` of `kind` non_finite | skipped | spike | collapse; the message is the one line a
    stopped run ends with."""

    def __init__(self, message: str, step: int, kind: str):
        super().__init__(message)
        self.step, self.kind = step, kind


class SpikeCheck:
    """A logged loss above `factor` x the median of the last `window` logged losses (positive medians only,
    once `window` are logged) is an anomaly; factor 0 turns it off."""

    def __init__(self, factor: float, window: int):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    def check(self, step: int, values: dict[str, float], last_good: str) -> None:
        loss = values.get("train/loss")
        if not self.factor or loss is None:
            return
        if len(self.recent) == self.recent.maxlen:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.factor * median:
                raise Anomaly(f"loss spike at step {step}: {loss:.4g} > run.spike_factor {self.factor:g} x the median "
                              f"{median:.4g} of the last {len(self.recent)} logged losses; {last_good}.", step, "spike")
        self.recent.append(loss)


class Guard:
    """The loop's side of `run.on_anomaly` for the run `run` (a `setup.Run`)."""

    def __init__(self, run):
        self.run, self.cfg = run, run.cfg.run
        self.ckpt_dir = run.cfg.output_dir / "checkpoints"
        self.spikes = SpikeCheck(self.cfg.spike_factor, self.cfg.spike_window)

    def check_collapse(self, step: int, scores: dict[str, float], last_good: str) -> None:
        """The online monitor's effective rank (`monitor/rankme`) below `run.collapse_rankme` is an anomaly."""
        rank, floor = scores.get("monitor/rankme"), self.cfg.collapse_rankme
        if floor and rank is not None and rank < floor:
            raise Anomaly(f"representation collapse at step {step}: monitor/rankme {rank:.4g} < run.collapse_rankme "
                          f"{floor:g}; {last_good}.", step, "collapse")

    def recover(self, anomaly: Anomaly, good_tag: str | None) -> int:
        """Record `anomaly`, then re-raise it (`stop`), or roll back to checkpoint `good_tag` and return its step.

        Stops with one line instead when `run.max_rollbacks` rollbacks are done or there is no good checkpoint.
        """
        run, cfg = self.run, self.cfg
        rollback = cfg.on_anomaly == "rollback"
        usable = good_tag is not None and (self.ckpt_dir / good_tag / checkpoint.MARKER).exists()
        allowed = rollback and usable and run.rollbacks < cfg.max_rollbacks
        run.rollbacks += allowed
        run.monitor.scalars(anomaly.step, {f"anomaly/{anomaly.kind}": 1.0, "anomaly/rollbacks": float(run.rollbacks)},
                            console=False)
        if not rollback:
            raise anomaly
        if not usable:
            which = "none written yet" if good_tag is None else f"{good_tag} is not complete there (run.keep_last?)"
            raise FloatingPointError(f"{anomaly} run.on_anomaly=rollback: no good checkpoint to roll back to in "
                                     f"{self.ckpt_dir}: {which}") from None
        if not allowed:
            raise FloatingPointError(f"{anomaly} run.on_anomaly=rollback: stopped after run.max_rollbacks="
                                     f"{cfg.max_rollbacks} rollbacks") from None
        client_state, rank_state = checkpoint.load(run.engine, self.ckpt_dir, good_tag, run.world.rank)
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])  # not rank_state["data"]: the stream goes on
        run.lr_scale *= cfg.rollback_lr_scale
        log.warning("anomaly at step %d (%s): %s Rolled back to %s (step %d), rollback %d of %d, lr x %.3g; the data "
                    "stream goes on past the bad window", anomaly.step, anomaly.kind, anomaly, good_tag,
                    client_state["step"], run.rollbacks, cfg.max_rollbacks, run.lr_scale)
        return client_state["step"]
