"""Data-path throughput: img/s of the CPU path (per worker, N workers) and of the GPU decode path.

    python -m benchmarks.data_throughput                       # 224px single views, workers 1,2,4,...
    python -m benchmarks.data_throughput --workers 1,8,14 --views dino --seconds 30

Writes synthetic shards of ImageNet-like JPEGs (500x375, about 110 KB, quality 90) once into
--dir, then streams them through `StreamLoader` exactly as training does (resampled shards, shuffle
buffer, per-sample seeds, collate in the workers) and prints a table. The shards are small enough to
sit in the page cache, so this measures decoding and augmentation, not storage.

Rows:
  cpu          decode + views in the DataLoader workers (data.decode=cpu); workers=0 is in-process, one core
  gpu-workers  the GPU path's worker side alone: read bytes, parse headers, draw every view's parameters
  gpu-device   the GPU path's device side alone: nvjpeg decode + the views' pixel work on packed batches
  gpu          both together, end to end (data.decode=gpu), batches on the GPU
  official     the official recipe's own CPU pipeline (torchvision v1 + PIL, ToTensor + Normalize) on the
               same JPEGs, in-process, measured in --repeats rounds interleaved with the workers=0 cpu row;
               the ratio (median over the rounds) is the per-core comparison, target >= 1.0x
Targets: CPU path >= 1.0x the official recipe per core; GPU path >= 3x the training step's img/s on one
GPU (--step-rate; for single views the MAE ViT-L rate of one H100; unmeasured without a GPU).
"""

import argparse
import contextlib
import io
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms as T

from data_pipeline.augment import RECIPE_CROP_SCALE, build_views
from data_pipeline.shards import Sample, write_shards
from data_pipeline.stream import StreamLoader, resolve_shards
from train.config import DataConfig

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_jpeg(seed: int, size=(500, 375), noise: float = 20.0, quality: int = 90) -> bytes:
    """A smooth random colour field plus sensor-like noise: JPEG sizes like ImageNet's (~110 KB at 500x375)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(low, np.float32) + rng.normal(0, noise, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_shards(out: Path, images: int, per_shard: int, size) -> tuple[list[str], float]:
    """(shard urls, mean JPEG bytes), written once per (count, size)."""
    out = out / f"synthetic_{images}_{size[0]}x{size[1]}"
    manifest = out / "train.json"
    if not manifest.exists():
        samples = [Sample(f"synthetic/{i}", synthetic_jpeg(i, size), "jpg", i % 1000, str(i % 1000))
                   for i in range(images)]
        write_shards(samples, out, "train", [str(c) for c in range(1000)], max_count=per_shard)
    urls = resolve_shards(str(manifest)).urls
    return urls, sum(os.path.getsize(u) for u in urls) / images


def rate(batches, batch_size: int, seconds: float, warmup: int, sync=lambda: None) -> tuple[float, float]:
    """(img/s of wall-clock, img per CPU-second of this process) over at least `seconds` after `warmup`
    batches (worker start-up excluded). The second is a core's capacity when the work is in-process,
    whatever else runs on the machine."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    sync()
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(it)
        count += 1
    sync()
    images = count * batch_size
    return images / (time.perf_counter() - start), images / max(time.process_time() - cpu, 1e-9)


class OfficialBlur:
    """moco-v3 moco/loader.py GaussianBlur and dino utils.py GaussianBlur: PIL's blur, radius = sigma."""

    def __init__(self, p: float = 1.0, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class OfficialSolarize:
    """moco-v3 Solarize / dino Solarization: PIL's ImageOps.solarize (threshold 128) with probability p."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def official_transform(views: str, size: int, local_crops: int = 8, local_size: int = 96):
    """The official recipes' own CPU pipelines (torchvision v1 transforms on PIL images + ToTensor + Normalize),
    written from main_moco.py (moco-v3), main_dino.py DataAugmentationDINO (dino), google-research/simclr
    data_util.py (transcribed to v1 + PIL), MAE main_pretrain.py (single) and MAE util/datasets.py (finetune:
    timm create_transform with RandAugment and random erasing)."""
    normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    scale = RECIPE_CROP_SCALE[views]
    if views == "single":
        return T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), normalize])
    if views == "finetune":
        from timm.data import create_transform

        return create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                                re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)

    def byol(crop_size, crop_scale, blur, solarize=0.0, interpolation=T.InterpolationMode.BICUBIC,
             jitter=(0.4, 0.4, 0.2, 0.1), flip_first=True):
        colour = [T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)]
        flip = [T.RandomHorizontalFlip()]
        return T.Compose([T.RandomResizedCrop(crop_size, scale=crop_scale, interpolation=interpolation)]
                         + (flip + colour if flip_first else colour)
                         + [OfficialBlur(blur), OfficialSolarize(solarize)] + ([] if flip_first else flip)
                         + [normalize])

    if views == "moco_v3":  # main_moco.py: bilinear (RandomResizedCrop's default), flip last
        bilinear = T.InterpolationMode.BILINEAR
        pair = [byol(size, scale, 1.0, 0.0, bilinear, flip_first=False),
                byol(size, scale, 0.1, 0.2, bilinear, flip_first=False)]
    elif views == "simclr":
        pair = [byol(size, scale, 0.5, jitter=(0.8, 0.8, 0.8, 0.2))] * 2
    else:
        pair = [byol(size, scale, 1.0), byol(size, scale, 0.1, 0.2)]
        pair += [byol(local_size, DataConfig().local_crop_scale, 0.5)] * local_crops
    return lambda img: [t(img) for t in pair]


def shard_jpegs(urls: list[str]) -> list[bytes]:
    """The encoded images of the shards, in memory."""
    import tarfile

    out = []
    for url in urls:
        with tarfile.open(url) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


def official_batches(transform, jpegs: list[bytes], batch_size: int):
    """The official loaders' work per batch: PIL decode (torchvision's pil_loader), transform, default_collate.
    A sample the transform fails on is skipped, as our stream skips it (timm's RandAugment posterize with
    0 bits raises on Pillow >= 11)."""
    index = 0
    while True:
        batch = []
        while len(batch) < batch_size:
            with Image.open(io.BytesIO(jpegs[index % len(jpegs)])) as img:
                with contextlib.suppress(ValueError):
                    batch.append((transform(img.convert("RGB")), 0))
            index += 1
        yield default_collate(batch)


def per_core(urls, jpegs, args) -> tuple[list[float], list[float]]:
    """Img per CPU-second of our CPU path and of the official recipe, in-process on one core, measured in
    `args.repeats` interleaved rounds (so both see the same machine load)."""
    data = DataConfig(views=args.views, decode="cpu")
    ours, official = [], []
    transform = official_transform(args.views, args.img_size)
    for _ in range(args.repeats):
        ours.append(rate(loader(urls, build_views(data, args.img_size), args, 0), args.batch_size, args.seconds,
                         args.warmup)[1])
        official.append(rate(official_batches(transform, jpegs, args.batch_size), args.batch_size, args.seconds,
                             args.warmup)[1])
    return ours, official


def loader(urls, views, args, workers: int, device=None) -> StreamLoader:
    return StreamLoader(urls, views, args.batch_size, seed=0, shuffle_buffer=args.shuffle_buffer, workers=workers,
                        pin_memory=device is not None and device.type == "cuda", device=device, mean=MEAN, std=STD)


def device_side(urls, view, args, device) -> float:
    """The GPU path's device work alone, on packed batches already in (pinned) host memory."""
    packed = [b for _, b in zip(range(4), loader(urls, view, args, workers=0))]
    if device.type == "cuda":
        packed = [{k: v.pin_memory() for k, v in b.items()} for b in packed]

    def batches():
        while True:
            for b in packed:
                yield view.to_device(dict(b), device, MEAN, STD)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return rate(batches(), args.batch_size, args.seconds, 2, sync)[0]


def run(args) -> list[dict]:
    size = tuple(int(x) for x in args.source_size.split("x"))
    urls, mean_bytes = make_shards(Path(args.dir), args.images, args.shard_size, size)
    print(f"{len(urls)} shards of synthetic {size[0]}x{size[1]} JPEGs, {mean_bytes / 1e3:.0f} KB each on average; "
          f"views {args.views} at {args.img_size}px, batch {args.batch_size}, {os.cpu_count()} CPU cores")
    data = DataConfig(views=args.views, decode="cpu")
    rows, official = [], []
    for workers in args.workers:
        if workers == 0:  # one core, in-process: ours and the official recipe interleaved
            ours, theirs = per_core(urls, shard_jpegs(urls), args)
            rows.append({"path": "cpu", "workers": 0, "img_s": statistics.median(ours),
                         "per_cpu_s": statistics.median(ours)})
            official.append({"path": "official", "workers": 0, "img_s": statistics.median(theirs),
                             "per_cpu_s": statistics.median(theirs),
                             "ratio": statistics.median(a / b for a, b in zip(ours, theirs)),
                             "runs": list(zip(ours, theirs))})
            continue
        img_s, _ = rate(loader(urls, build_views(data, args.img_size), args, workers), args.batch_size,
                        args.seconds, args.warmup)
        rows.append({"path": "cpu", "workers": workers, "img_s": img_s, "per_cpu_s": None})
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    on_device = build_views(DataConfig(views=args.views, decode="gpu"), args.img_size, cuda or torch.device("cpu"))
    if hasattr(on_device, "to_device"):
        for workers in sorted({0, max(args.workers)}):
            img_s, per_cpu_s = rate(loader(urls, on_device, args, workers), args.batch_size, args.seconds, args.warmup)
            rows.append({"path": "gpu-workers", "workers": workers, "img_s": img_s,
                         "per_cpu_s": per_cpu_s if not workers else None})
        if cuda is not None:
            rows.append({"path": "gpu-device", "workers": 0, "img_s": device_side(urls, on_device, args, cuda),
                         "per_cpu_s": None})
            workers = max(args.workers)
            img_s, _ = rate(loader(urls, on_device, args, workers, cuda), args.batch_size, args.seconds, args.warmup,
                            torch.cuda.synchronize)
            rows.append({"path": "gpu", "workers": workers, "img_s": img_s, "per_cpu_s": None})
    return rows + official


STEP = {"single": "MAE ViT-L on one H100"}  # the step whose demand --step-rate gives (the default 2600)


def print_table(rows: list[dict], args) -> None:
    step = STEP.get(args.views, "the training step on one GPU")
    target = 3 * args.step_rate if args.step_rate else None
    print(f"\n{'path':<12} {'workers':>7} {'img/s':>9} {'img/s/worker':>13} {'img/CPU-s':>10} {'vs target':>10}")
    for row in rows:
        per = row["img_s"] / row["workers"] if row["workers"] else row["img_s"]
        cpu_s = f"{row['per_cpu_s']:.0f}" if row["per_cpu_s"] else "-"
        versus = f"{row['img_s'] / target:>9.2f}x" if target else f"{'-':>10}"
        print(f"{row['path']:<12} {row['workers']:>7} {row['img_s']:>9.0f} {per:>13.0f} {cpu_s:>10} {versus}")
    for row in rows:
        if row["path"] == "official":
            runs = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in row["runs"])
            verdict = "met" if row["ratio"] >= 1.0 else "NOT met"
            print(f"\nper core, {args.views}: ours / official recipe = {row['ratio']:.2f}x (median of "
                  f"{len(row['runs'])} interleaved runs, img per CPU-second ours/official: {runs}); "
                  f"target >= 1.0x: {verdict}")
    if target:
        print(f"\ntarget: 3 x {args.step_rate:.0f} img/s ({step}) = {target:.0f} img/s")
    else:
        print(f"\ntarget: GPU path >= 3 x {step} (img/s): unmeasured (give --step-rate, measured on the GPU "
              "by benchmarks.step_throughput)")
    workers = args.node_cores - 2  # two cores left to the training process
    for path in ("cpu", "gpu-workers"):
        core = next((r["per_cpu_s"] for r in rows if r["path"] == path and r["per_cpu_s"]), None)
        if core:
            versus = f" ({core * workers / target:.2f}x the target)" if target else ""
            print(f"{path} on a {args.node_cores}-core node, extrapolated: {core:.0f} img per CPU-second x {workers} "
                  f"workers = {core * workers:.0f} img/s{versus}")
    print("(samples are independent, so the rate scales with busy cores; img/CPU-s is measured in-process and does "
          "not depend much on what else runs on the machine)")
    if not torch.cuda.is_available():
        print("gpu-device / gpu rows: no CUDA on this machine (GPU path unmeasured)")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vitssl_data_bench"),
                        help="where the synthetic shards are written (once)")
    parser.add_argument("--images", type=int, default=512, help="distinct synthetic images")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard")
    parser.add_argument("--source-size", default="500x375", help="WxH of the synthetic JPEGs")
    parser.add_argument("--views", default="single", choices=list(RECIPE_CROP_SCALE))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--workers", default=",".join(str(w) for w in sorted({0, 1, os.cpu_count() or 1})),
                        help="comma-separated DataLoader worker counts for the CPU path (0: in-process)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per row")
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of ours and the official recipe")
    parser.add_argument("--step-rate", type=float, default=None,
                        help="img/s of the training step on one GPU (default: 2600, MAE ViT-L on an H100, for single "
                             "views; unset for the others)")
    parser.add_argument("--node-cores", type=int, default=16, help="cores of the node to extrapolate the CPU path to")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    if args.step_rate is None and args.views == "single":
        args.step_rate = 2600.0
    torch.set_num_threads(1)  # one core per loader, as in a worker
    rows = run(args)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()
