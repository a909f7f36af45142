"""Write WebDataset shards (tar files of image + class + metadata) and the manifest beside them.

    python -m data_pipeline.shards digits OUT_DIR                  # the embedded demo data set
    python -m data_pipeline.shards folder IMAGENET/train OUT_DIR --split train

A sample is `{key}.jpg|png` (original bytes), `{key}.cls` (class index) and `{key}.json`
(`label` name and the source `key`). The manifest `OUT_DIR/<split>.json` lists every shard with its
sample count and sha256, the class names and the total, so nobody passes sample counts by hand.
"""

import argparse
import hashlib
import io
import json
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp"}
DIGITS_SIZE = 32  # the 8x8 scikit-learn digits are upsampled to this side


@dataclass
class Sample:
    key: str  # source identifier (relative path, or "digits/<index>")
    data: bytes  # encoded image bytes, written unchanged
    ext: str  # "jpg", "png", ...
    cls: int
    label: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shards(samples: Iterable[Sample], out_dir: str | Path, split: str, classes: list[str],
                 max_count: int = 1000, max_bytes: int = 1 << 30) -> dict:
    """Write `samples` into `out_dir/<split>-NNNNNN.tar` shards and `out_dir/<split>.json`.

    A shard is closed after `max_count` samples or `max_bytes` of image data. The manifest is
    written last (atomically), so its presence means the shard set is complete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer, count, size = None, 0, 0

    def close():
        nonlocal writer
        if writer is not None:
            writer.close()
            name = shards[-1]["url"]
            shards[-1].update(count=count, sha256=sha256_file(out_dir / name))
            writer = None

    for index, sample in enumerate(samples):
        if writer is None or count >= max_count or size >= max_bytes:
            close()
            name = f"{split}-{len(shards):06d}.tar"
            shards.append({"url": name})
            writer, count, size = wds.TarWriter(str(out_dir / name)), 0, 0
        writer.write({
            "__key__": f"{index:09d}",
            sample.ext: sample.data,
            "cls": sample.cls,
            "json": {"label": sample.label, "key": sample.key},
        })
        count += 1
        size += len(sample.data)
    close()
    if not shards:
        raise ValueError(f"no samples to write for split {split!r} into {out_dir}")
    manifest = {
        "split": split,
        "num_samples": sum(s["count"] for s in shards),
        "classes": classes,
        "pattern": f"{split}-{{000000..{len(shards) - 1:06d}}}.tar",
        "shards": shards,
    }
    tmp = out_dir / f".{split}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / f"{split}.json")
    return manifest


def digits_samples(split: str) -> tuple[list[Sample], list[str]]:
    """scikit-learn's 1,797 handwritten digits as 32x32 PNGs; every 5th image of a class is `val`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
    digits = load_digits()
    seen = {c: 0 for c in range(10)}
    out = []
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        target = int(target)
        in_val = seen[target] % 5 == 4
        seen[target] += 1
        if in_val != (split == "val"):
            continue
        gray = Image.fromarray(np.clip(pixels * 16, 0, 255).astype(np.uint8), mode="L")
        buf = io.BytesIO()
        gray.resize((DIGITS_SIZE, DIGITS_SIZE), Image.BICUBIC).save(buf, format="PNG")
        out.append(Sample(f"digits/{index}", buf.getvalue(), "png", target, str(target)))
    return out, [str(c) for c in range(10)]


def build_digits_shards(out_dir: str | Path, max_count: int = 200) -> dict[str, Path]:
    """Write the digits train/val shard sets once; return their manifest paths."""
    out_dir = Path(out_dir)
    manifests = {}
    for split in ("train", "val"):
        path = out_dir / f"{split}.json"
        if not path.exists():
            samples, classes = digits_samples(split)
            write_shards(samples, out_dir, split, classes, max_count=max_count)
        manifests[split] = path
    return manifests


def folder_samples(root: str | Path, shuffle_seed: int | None = 0) -> tuple[Iterator[Sample], list[str]]:
    """Samples of an image-folder tree (ImageNet layout: one sub-folder per class).

    Files are shuffled once (seeded) so that every shard mixes classes, which the streaming
    shuffle buffer relies on.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ImageNet layout root/<class>/<image>)")
    files = [(path, cls) for cls, name in enumerate(classes)
             for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(f"{root}: no images with extensions {sorted(IMAGE_EXTENSIONS)}")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(files)

    def generate():
        for path, cls in files:
            yield Sample(str(path.relative_to(root)), path.read_bytes(), IMAGE_EXTENSIONS[path.suffix.lower()],
                         cls, classes[cls])

    return generate(), classes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_digits = sub.add_parser("digits", help="write the embedded digits data set (train + val)")
    p_digits.add_argument("out_dir")
    p_folder = sub.add_parser("folder", help="convert an image-folder tree (one folder per class)")
    p_folder.add_argument("root")
    p_folder.add_argument("out_dir")
    p_folder.add_argument("--split", default="train")
    p_folder.add_argument("--max-count", type=int, default=1000, help="samples per shard")
    p_folder.add_argument("--max-bytes", type=float, default=1e9, help="image bytes per shard")
    p_folder.add_argument("--seed", type=int, default=0, help="seed of the one-off file shuffle")
    args = parser.parse_args(argv)
    if args.command == "digits":
        for split, path in build_digits_shards(args.out_dir).items():
            print(f"{split}: {json.loads(path.read_text())['num_samples']} samples, manifest {path}")
    else:
        samples, classes = folder_samples(args.root, args.seed)
        manifest = write_shards(samples, args.out_dir, args.split, classes, args.max_count, int(args.max_bytes))
        print(f"{args.split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
              f"{len(classes)} classes, manifest {Path(args.out_dir) / (args.split + '.json')}")


if __name__ == "__main__":
    main()
