"""Data-path throughput: img/s of the CPU path (per worker, N workers) and of the GPU decode path.

    python -m benchmarks.data_throughput                       # 224px single views, workers 1,2,4,...
    python -m benchmarks.data_throughput --workers 1,8,14 --views dino --seconds 30

Writes synthetic shards of ImageNet-like JPEGs (500x375, about 110 KB, quality 90) once into
--dir, then streams them through `StreamLoader` exactly as training does (resampled shards, shuffle
buffer, per-sample seeds, collate in the workers) and prints a table. The shards are small enough to
sit in the page cache, so this measures decoding and augmentation, not storage.

Rows:
  cpu          decode + views in the DataLoader workers (data.decode=cpu); workers=0 is in-process, one core
  gpu-workers  the GPU path's worker side alone: read bytes, parse headers, draw crops (no decoding)
  gpu-device   the GPU path's device side alone: nvjpeg decode + crop/resize/flip/normalise of packed batches
  gpu          both together, end to end (data.decode=gpu), batches on the GPU
The target is 3x the MAE ViT-L step rate of one H100 (--step-rate, img/s).
"""

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.augment import DeviceSingleView, build_views
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


def loader(urls, views, args, workers: int, device=None) -> StreamLoader:
    return StreamLoader(urls, views, args.batch_size, seed=0, shuffle_buffer=args.shuffle_buffer, workers=workers,
                        pin_memory=device is not None and device.type == "cuda", device=device, mean=MEAN, std=STD)


def device_side(urls, args, device) -> float:
    """The GPU path's device work alone, on packed batches already in (pinned) host memory."""
    view = DeviceSingleView(args.img_size)
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
    rows = []
    for workers in args.workers:
        img_s, per_cpu_s = rate(loader(urls, build_views(data, args.img_size), args, workers), args.batch_size,
                                args.seconds, args.warmup)
        rows.append({"path": "cpu", "workers": workers, "img_s": img_s,
                     "per_cpu_s": per_cpu_s if not workers else None})
    if args.views == "single":
        for workers in sorted({0, max(args.workers)}):
            img_s, per_cpu_s = rate(loader(urls, DeviceSingleView(args.img_size), args, workers), args.batch_size,
                                    args.seconds, args.warmup)
            rows.append({"path": "gpu-workers", "workers": workers, "img_s": img_s,
                         "per_cpu_s": per_cpu_s if not workers else None})
        if torch.cuda.is_available():
            device = torch.device("cuda")
            rows.append({"path": "gpu-device", "workers": 0, "img_s": device_side(urls, args, device),
                         "per_cpu_s": None})
            workers = max(args.workers)
            img_s, _ = rate(loader(urls, DeviceSingleView(args.img_size), args, workers, device), args.batch_size,
                            args.seconds, args.warmup, torch.cuda.synchronize)
            rows.append({"path": "gpu", "workers": workers, "img_s": img_s, "per_cpu_s": None})
    return rows


def print_table(rows: list[dict], args) -> None:
    target = 3 * args.step_rate
    print(f"\n{'path':<12} {'workers':>7} {'img/s':>9} {'img/s/worker':>13} {'img/CPU-s':>10} {'vs target':>10}")
    for row in rows:
        per = row["img_s"] / row["workers"] if row["workers"] else row["img_s"]
        cpu_s = f"{row['per_cpu_s']:.0f}" if row["per_cpu_s"] else "-"
        print(f"{row['path']:<12} {row['workers']:>7} {row['img_s']:>9.0f} {per:>13.0f} {cpu_s:>10} "
              f"{row['img_s'] / target:>9.2f}x")
    print(f"\ntarget: 3 x {args.step_rate:.0f} img/s (MAE ViT-L on one H100) = {target:.0f} img/s")
    workers = args.node_cores - 2  # two cores left to the training process
    for path in ("cpu", "gpu-workers"):
        core = next((r["per_cpu_s"] for r in rows if r["path"] == path and r["per_cpu_s"]), None)
        if core:
            print(f"{path} on a {args.node_cores}-core node, extrapolated: {core:.0f} img per CPU-second x {workers} "
                  f"workers = {core * workers:.0f} img/s ({core * workers / target:.2f}x the target)")
    print("(samples are independent, so the rate scales with busy cores; img/CPU-s is measured in-process and does "
          "not depend on what else runs on the machine)")
    if not torch.cuda.is_available() and args.views == "single":
        print("gpu-device / gpu rows: no CUDA on this machine")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vitssl_data_bench"),
                        help="where the synthetic shards are written (once)")
    parser.add_argument("--images", type=int, default=512, help="distinct synthetic images")
    parser.add_argument("--shard-size", type=int, default=64, help="images per shard")
    parser.add_argument("--source-size", default="500x375", help="WxH of the synthetic JPEGs")
    parser.add_argument("--views", default="single", choices=["single", "moco_v3", "simclr", "dino"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--workers", default=",".join(str(w) for w in sorted({0, 1, os.cpu_count() or 1})),
                        help="comma-separated DataLoader worker counts for the CPU path (0: in-process)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per row")
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing starts")
    parser.add_argument("--step-rate", type=float, default=2600.0, help="MAE ViT-L img/s of one H100")
    parser.add_argument("--node-cores", type=int, default=16, help="cores of the node to extrapolate the CPU path to")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)  # one core per loader, as in a worker
    rows = run(args)
    print_table(rows, args)
    return rows


if __name__ == "__main__":
    main()
