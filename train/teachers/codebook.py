"""Fit the k-CLIP codebook (MaPeT): teacher patch features quantised by k-means.

Fit the codebook once per teacher and student grid, from the same run config that trains with it:

    python -m train.teachers.codebook --config train/configs/mapet_vit_b.yaml [section.key=value ...]

As MaPeT's kmeans_processing.py: it streams every `data.train` image once (the centred square of
the short side, as CLIP's resize + centre crop), runs the frozen teacher (`method.teacher`; the
paper's: CLIP RN50x64's last stage at 448 px), keeps a uniform random subset of the patch features
on the student's grid in float16 (`--max-patches`: 512 per code by default, faiss's
max_points_per_centroid in the official script), fits `method.num_codes` centroids with torch
k-means on the GPU when there is one (`train.teachers.kmeans`: 20 iterations, random init, the
best of `--restarts` 5 runs, as faiss niter 20 / nredo 5) and writes `method.codebook`.
During training `train.teachers.tokenizer.KCLIPTokenizer` maps the teacher's features to code ids on the fly.
"""

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_pipeline.augment import EvalView
from data_pipeline.batch import to_device
from data_pipeline.shards import available_cpus, ensure_demo_shards
from data_pipeline.stream import EvalStream, die_with_parent, resolve_shards
from train.cli import config_of, config_parser, run_command
from train.config import Config, ConfigError
from train.teachers.clip import FrozenTeacher
from train.teachers.kmeans import assign, kmeans

log = logging.getLogger("train")


def collect_features(cfg: Config, teacher: FrozenTeacher, max_patches: int, device: torch.device,
                     batch_size: int = 256, workers: int = 4, seed: int = 0) -> torch.Tensor:
    """A uniform random subset (about `max_patches`) of the teacher's patch features over `data.train`."""
    shards = resolve_shards(cfg.data.train)
    per_image = teacher.grid[0] * teacher.grid[1]
    keep = min(1.0, max_patches / (shards.num_samples * per_image)) if shards.num_samples else 1.0
    stream = EvalStream(shards.urls, EvalView(cfg.model.img_size, crop_pct=1.0), batch_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    feats, count = [], 0
    for batch in DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=die_with_parent):
        images = to_device(batch, device, cfg.data.mean, cfg.data.std)["images"]
        patches = teacher(images)[1].flatten(0, 1)
        patches = patches[torch.rand(len(patches), generator=gen, device=device) < keep]
        feats.append(patches[:max_patches - count].half())
        count += len(feats[-1])
        if count >= max_patches:
            break
    if stream.skipped.count:
        log.warning("skipped %d unreadable samples", stream.skipped.count)
    return torch.cat(feats)


def fit_codebook(cfg: Config, out: str, max_patches: int, iters: int = 20, init: str = "random", seed: int = 0,
                 batch_size: int = 256, workers: int = 4, restarts: int = 5) -> dict:
    """Fit and save the k-CLIP codebook of the run `cfg`; returns what was saved besides the centroids."""
    m = cfg.method
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    teacher = FrozenTeacher(m.teacher, grid, cfg.data.mean, cfg.data.std)
    start = time.perf_counter()
    feats = collect_features(cfg, teacher, max_patches, device, batch_size, workers, seed)
    log.info("collected %d patch features (%d-d) in %.0f s; k-means with %d codes on %s", len(feats),
             feats.shape[1], time.perf_counter() - start, m.num_codes, device)
    start = time.perf_counter()
    centroids, mse = kmeans(feats, m.num_codes, iters=iters, init=init, seed=seed, restarts=restarts)
    usage = torch.bincount(assign(feats, centroids), minlength=m.num_codes)
    meta = {"teacher": asdict(m.teacher), "grid": list(grid), "num_patches": len(feats), "iters": iters,
            "init": init, "restarts": restarts, "seed": seed, "mse": mse, "codes_used": int((usage > 0).sum())}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"centroids": centroids.cpu(), **meta}, out)
    log.info("k-means in %.0f s: mse %.4g, %d of %d codes used; codebook written to %s",
             time.perf_counter() - start, mse, meta["codes_used"], m.num_codes, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m train.teachers.codebook", __doc__.split("\n")[0],
                           "the run config (method.teacher, method.num_codes, data.train)")
    parser.add_argument("--out", default="", help="where to write the codebook (default: method.codebook)")
    parser.add_argument("--max-patches", type=int, default=0,
                        help="patch features to fit on (0: 512 per code, as MaPeT's max_points_per_centroid)")
    parser.add_argument("--iters", type=int, default=20, help="Lloyd iterations (20, as MaPeT's faiss k-means)")
    parser.add_argument("--restarts", type=int, default=5, help="k-means runs, the best kept (5: MaPeT's nredo)")
    parser.add_argument("--init", default="random", choices=["random", "kmeans++"],
                        help="random: k sampled points, as faiss (MaPeT)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=min(4, available_cpus()),
                        help="DataLoader workers per rank (default: 4, or fewer on a smaller machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_intermixed_args(argv)
    return run_command(lambda: fit_command(args))


def fit_command(args) -> None:
    cfg = config_of(args)
    if not hasattr(cfg.method, "num_codes"):
        raise ConfigError(f"method.name={cfg.method.name!r} has no k-CLIP codebook (use a mapet config)")
    ensure_demo_shards(cfg.data, cfg.output_dir / "shards")  # the digits demo when data.train is ""
    out = args.out or cfg.method.codebook
    if not out:
        raise ConfigError("set method.codebook or --out")
    fit_codebook(cfg, out, args.max_patches or 512 * cfg.method.num_codes, args.iters, args.init, args.seed,
                 args.batch_size, args.workers, args.restarts)


if __name__ == "__main__":
    sys.exit(main())
