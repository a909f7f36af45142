"""What the engine measures between two log steps: the methods' reports, data-wait, aux-step and wall time."""

import contextlib
import math
import time

import torch
import torch.distributed as dist

from train.compression import FULL
from train.engine.guard import Anomaly
from train.monitor import gpu_peak_flops


class Meter:
    """Sums of reported values and timers over a logging window; `values()` turns them into the logged scalars.

    The window's wall time excludes what `excluded()` wraps (the compression diagnostic, evaluation), so
    img/s, tokens/s and MFU count training only.
    """

    def __init__(self, global_batch: int, world_size: int, device: torch.device):
        self.global_batch, self.world_size, self.device = global_batch, world_size, device
        self.peak_flops = gpu_peak_flops()
        self.restart()

    def restart(self) -> None:
        """Start a new logging window."""
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.wait = self.aux_time = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def next(self, iterator):
        """The next batch of `iterator`, its wait counted as data wait."""
        t0 = time.perf_counter()
        batch = next(iterator)
        self.wait += time.perf_counter() - t0
        return batch

    def add(self, report: dict[str, torch.Tensor]) -> None:
        """Accumulate a report (detached scalar tensors, on the device: no host sync)."""
        for key, value in report.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
            self.counts[key] = self.counts.get(key, 0) + 1

    @contextlib.contextmanager
    def aux(self):
        """Time an aux step alone (a negligible stall once per step: the device is synchronised around it)."""
        synchronize(self.device)
        t0 = time.perf_counter()
        yield
        synchronize(self.device)
        self.aux_time += time.perf_counter() - t0

    @contextlib.contextmanager
    def excluded(self):
        """Leave what runs inside out of the window's wall time."""
        t0 = time.perf_counter()
        yield
        self.start += time.perf_counter() - t0

    def values(self, step: int, scheduled: dict[str, float], method, setting=FULL, grad_norm=None, loader=None,
               aux: bool = False, last_good: str = "") -> dict[str, float]:
        """The window's scalars: the reports' means (over reports and ranks; one host sync), `scheduled` (lr, ...),
        grad norm, throughput (img/s, tokens/s and MFU under this step's compression `setting`), data wait, aux
        share and the loader's counters. A non-finite report stops the run naming `last_good`."""
        values = reduce_report(self.sums, self.counts)
        if not all(math.isfinite(v) for v in values.values()):
            raise Anomaly(f"non-finite loss at step {step} ({values}); {last_good}. Lower optim.base_lr, set "
                          "optim.clip_grad, or check the data.", step, "non_finite")
        elapsed = time.perf_counter() - self.start
        values.update(scheduled)
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        img_s = self.steps * self.global_batch / elapsed
        values["perf/img_per_s"] = img_s
        tokens_per_image = method.tokens_per_image(compression=setting)
        flops_per_image = method.flops_per_image(compression=setting)
        if tokens_per_image:
            values["perf/tokens_per_s"] = img_s * tokens_per_image
        if self.peak_flops and flops_per_image:
            values["perf/mfu"] = img_s * flops_per_image / (self.peak_flops * self.world_size)
        if self.device.type == "cuda":
            values["perf/max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        values["data/wait_fraction"] = self.wait / elapsed
        if aux:
            values["perf/aux_fraction"] = self.aux_time / elapsed
        values["data/skipped"] = float(loader.skipped)
        values["data/samples_seen"] = float(loader.samples_seen)
        return values


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_report(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
    """Mean of each reported value over its reports since the last log and over ranks (one host sync)."""
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([sums[k] / counts[k] for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return {f"train/{k}": v for k, v in zip(keys, stacked.tolist())}
