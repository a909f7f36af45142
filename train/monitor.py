"""Rank-0 logging: TensorBoard scalars and images, a metrics.jsonl file and a console progress line."""

import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from train.distributed import rank

log = logging.getLogger("train")

# dense bf16 tensor-core peak FLOP/s by device name (for MFU)
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def gpu_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_FLOPS.items() if k in name), None)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the metrics.jsonl rows up to `step` (a resumed run writes the later ones again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


class Monitor:
    """Rank 0's records. `resume_step`: a resumed run's records past that step (written after its
    checkpoint by the interrupted run) are dropped, so every step appears once however often it resumes:
    metrics.jsonl is cut there and TensorBoard purges them (SummaryWriter's purge_step)."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, mean, std, resume_step: int | None = None):
        self.enabled, self.total_steps = enabled, total_steps
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.start = time.time()
        self.last_image_step = None
        if enabled and resume_step is not None:
            drop_rows_after(out_dir / "metrics.jsonl", resume_step)
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=purge) if enabled else None
        self.jsonl = open(out_dir / "metrics.jsonl", "a") if enabled else None

    def scalars(self, step: int, values: dict[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if console:
            elapsed = time.time() - self.start
            parts = [f"step {step}/{self.total_steps}"]
            parts += [f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items() if k.startswith("train/")]
            if "perf/img_per_s" in values:
                parts.append(f"{values['perf/img_per_s']:.0f} img/s")
            if "perf/mfu" in values:
                parts.append(f"MFU {values['perf/mfu']:.2f}")
            parts.append(f"data wait {values.get('data/wait_fraction', 0):.0%}")
            parts.append(f"skipped {values.get('data/skipped', 0):.0f}")
            parts.append(f"{elapsed / 60:.1f} min")
            log.info(" | ".join(parts))

    def images(self, step: int, panels: dict[str, torch.Tensor]) -> None:
        """Panels of normalised images (N, 3, H, W), one per row, unnormalised and clamped to [0, 1]."""
        self.last_image_step = step
        if not self.enabled:
            return
        for name, images in panels.items():
            images = (images.detach().float().cpu() * self.std + self.mean).clamp(0, 1)
            self.writer.add_image(f"images/{name}", make_grid(images, nrow=1, padding=1), step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def write_results(out_dir: Path, name: str, result: dict, scalars: dict[str, float], step: int) -> Path:
    """Rank 0 writes `out_dir/eval/<name>.json` and the scalars to TensorBoard (`out_dir/tb`) at `step`."""
    path = out_dir / "eval" / f"{name}.json"
    if rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    with SummaryWriter(str(out_dir / "tb")) as writer:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    log.info("results: %s (TensorBoard: %s)", path, out_dir / "tb")
    return path
