"""Write WebDataset shards (tar files of image + class + metadata) with a manifest beside them, and verify them.

    python -m data_pipeline.shards digits OUT_DIR                                   # the embedded demo data
    python -m data_pipeline.shards folder IMAGENET/train OUT_DIR --split train --workers 16
    python -m data_pipeline.shards list train.csv OUT_DIR --split train --root /data  # lines: path[,label]
    python -m data_pipeline.shards verify OUT_DIR/train.json --workers 16

A sample is `{key}.jpg|png` (image), `{key}.cls` (class index) and `{key}.json` (`label`: the class
name, e.g. the synset, and `key`: the source path). RGB and grayscale JPEGs and PNGs keep their
original bytes; anything else that decodes (CMYK JPEG, alpha, palette, WebP, ...) becomes an RGB
JPEG; `--max-side` re-encodes larger images to that longest side. Empty, truncated and non-image
files are skipped and listed by key in the manifest.

Conversion is planned up front (a seeded shuffle of the files, cut into shards of about
`--max-bytes`), written by worker processes one shard at a time (temporary file, then rename) and
restartable: rerunning the same command after a kill writes only the missing shards. The manifest
`OUT_DIR/<split>.json` (shard URLs, counts, sha256, classes, skipped keys) is written last.
"""

import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import tarfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from data_pipeline.augment import IMAGE_KEYS, to_rgb
from data_pipeline.stream import key_and_extension, resolve_shards
from train.config import ConfigError

log = logging.getLogger(__name__)
DIGITS_SIZE = 32  # the 8x8 scikit-learn digits are upsampled to this side
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # stored as they are when RGB or grayscale
ESTIMATE_FILES = 200  # files encoded up front to estimate the bytes per sample


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


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_tar(path: Path, samples: Iterable[tuple[str, Sample]]) -> int:
    """Write (tar key, sample) pairs to `path` via a temporary file, fsync'ed and renamed; returns the count."""
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f)
        for key, s in samples:
            writer.write({"__key__": key, s.ext: s.data, "cls": s.cls, "json": {"label": s.label, "key": s.key}})
            count += 1
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def _write_manifest(out_dir: Path, split: str, classes: list[str], shards: list[dict], **extra) -> dict:
    """Write `out_dir/<split>.json` atomically (its presence means the shard set is complete)."""
    if not shards:
        raise ValueError(f"no samples to write for split {split!r} into {out_dir}")
    manifest = {"split": split, "num_samples": sum(s["count"] for s in shards), "classes": classes,
                "shards": [{k: s[k] for k in ("url", "count", "sha256")} for s in shards], **extra}
    _atomic_write_text(out_dir / f"{split}.json", json.dumps(manifest, indent=1))
    return manifest


def write_shards(samples: Iterable[Sample], out_dir: str | Path, split: str, classes: list[str],
                 max_count: int = 1000, max_bytes: int = 1 << 30) -> dict:
    """Write in-memory `samples` in order into `out_dir/<split>-NNNNNN.tar` shards (one process) and the manifest.

    A shard is closed after `max_count` samples or `max_bytes` of image data.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def chunks():
        chunk, size = [], 0
        for index, sample in enumerate(samples):
            if chunk and (len(chunk) >= max_count or size >= max_bytes):
                yield chunk
                chunk, size = [], 0
            chunk.append((f"{index:09d}", sample))
            size += len(sample.data)
        if chunk:
            yield chunk

    shards = []
    for number, chunk in enumerate(chunks()):
        url = f"{split}-{number:06d}.tar"
        count = _write_tar(out_dir / url, chunk)
        shards.append({"url": url, "count": count, "sha256": sha256_file(out_dir / url)})
    return _write_manifest(out_dir, split, classes, shards)


def digits_samples(split: str) -> tuple[list[Sample], list[str]]:
    """scikit-learn's 1,797 handwritten digits as 32x32 PNGs; every 5th image of a class is `val`."""
    from sklearn.datasets import load_digits  # optional: scikit-learn only for the embedded demo data

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


def ensure_demo_shards(data, out_dir: str | Path, write: bool = True) -> bool:
    """With no `data.train` (the config's data section), point data.train / data.val at the embedded digits
    shards in `out_dir`, written there when `write` (one process of a run). True when it did, so the caller
    can wait for the writer (every rank gets the same answer)."""
    if data.train:
        return False
    out_dir = Path(out_dir)
    if write:
        build_digits_shards(out_dir)
    data.train = str(out_dir / "train.json")
    data.val = data.val or str(out_dir / "val.json")
    return True


def manifest_classes(shards: str) -> list[str] | None:
    """The class names a shard manifest lists (None for a pattern or a manifest without them)."""
    if not shards or not shards.endswith(".json") or not Path(shards).is_file():
        return None
    return json.loads(Path(shards).read_text()).get("classes") or None


def num_classes_of(train: str, val: str, requested: int = 0, key: str = "method.num_classes") -> int | None:
    """The class count the manifests of `train` and `val` agree on (and `requested`, when set), else an error."""
    train_classes, val_classes = manifest_classes(train), manifest_classes(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise ConfigError(f"mismatched classes: {train} lists {len(train_classes)} classes, {val} lists "
                          f"{len(val_classes)} (or in another order)")
    known = len(train_classes or val_classes or [])
    if requested and known and requested != known:
        raise ConfigError(f"{key}={requested} but {train if train_classes else val} lists {known} classes")
    return requested or known or None


# ---------------------------------------------------------------- conversion of image files


def encode_image(data: bytes, max_side: int = 0, quality: int = 95) -> tuple[bytes, str, bool]:
    """(bytes to store, extension, converted) for one image file; ValueError when it is empty or not an image.

    RGB/grayscale JPEG and PNG are kept byte for byte (unless larger than `max_side`); other modes and
    formats are decoded, made RGB (transparency over white) and re-encoded as JPEG.
    """
    if not data:
        raise ValueError("empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # a full decode: truncated and corrupt files fail here, not in training
    except Exception as err:
        raise ValueError(f"not a readable image ({err})") from None
    too_big = max_side and max(img.size) > max_side
    if img.format in KEPT_FORMATS and img.mode in ("RGB", "L") and not too_big:
        return data, KEPT_FORMATS[img.format], False
    img = to_rgb(img)
    if too_big:
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg", True


def folder_sources(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(key = path relative to `root`, class) of every file under `root/<class>/` (ImageNet layout) and the
    sorted class names. Every file is a candidate; those that are not images are skipped (and listed) later.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ImageNet layout root/<class>/<image>)")
    sources = []
    for cls, name in enumerate(classes):
        for dirpath, _, files in os.walk(root / name):
            for file in files:
                sources.append((os.path.relpath(os.path.join(dirpath, file), root), cls))
    if not sources:
        raise ValueError(f"{root}: the class folders hold no files")
    return sorted(sources), classes


def list_sources(list_file: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(key = the path as listed, class) from a file list: one `path` per line (class = its folder's name)
    or CSV `path,label` (a header line `path,label` is allowed). Labels that are all integers are class
    indices; otherwise the classes are the sorted label names.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"file list not found: {list_file}")
    rows = []
    with open(list_file, newline="") as f:
        for number, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip() or (number == 1 and [c.strip() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) > 2:
                raise ValueError(f"{list_file}:{number}: expected 'path' or 'path,label', got {row}")
            path = row[0].strip()
            label = row[1].strip() if len(row) == 2 else Path(path).parent.name
            if not label:
                raise ValueError(f"{list_file}:{number}: no label for {path}")
            rows.append((path, label))
    if not rows:
        raise ValueError(f"{list_file}: no files listed")
    labels = {label for _, label in rows}
    if all(label.isdigit() for label in labels):
        return [(k, int(label)) for k, label in rows], [str(i) for i in range(max(int(x) for x in labels) + 1)]
    classes = sorted(labels)
    index = {name: i for i, name in enumerate(classes)}
    return [(k, index[label]) for k, label in rows], classes


def _read_encoded(path: str, max_side: int, quality: int) -> tuple[bytes, str, bool]:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read ({err.strerror or err})") from None
    return encode_image(data, max_side, quality)


def samples_per_shard(sources: list, base: str, max_count: int, max_bytes: int, max_side: int, quality: int,
                      seed: int) -> int:
    """Samples per shard so that a shard holds about `max_bytes` (estimated on a seeded sample of the files)."""
    probe = random.Random(seed).sample(sources, min(ESTIMATE_FILES, len(sources)))
    sizes = []
    for key, _ in probe:
        try:
            sizes.append(len(_read_encoded(os.path.join(base, key), max_side, quality)[0]))
        except ValueError:
            pass
    mean = sum(sizes) / len(sizes) if sizes else 1
    count = max(1, int(max_bytes // mean))
    return min(count, max_count) if max_count else count


def _convert_shard(task: dict) -> dict:
    """Worker: read, check and encode one planned shard's files and write it; returns its record."""
    out_dir, url, classes = Path(task["out_dir"]), task["url"], task["classes"]
    skipped, converted = [], 0

    def samples():
        nonlocal converted
        for offset, (key, cls) in enumerate(task["sources"]):
            try:
                data, ext, changed = _read_encoded(os.path.join(task["base"], key), task["max_side"], task["quality"])
            except ValueError as err:
                skipped.append({"key": key, "reason": str(err)})
                continue
            converted += changed
            yield f"{task['first'] + offset:09d}", Sample(key, data, ext, cls, classes[cls])

    count = _write_tar(out_dir / url, samples())
    return {"index": task["index"], "url": url, "count": count, "sha256": sha256_file(out_dir / url),
            "converted": converted, "skipped": skipped}


def convert(sources: list[tuple[str, int]], classes: list[str], base: str | Path, out_dir: str | Path, split: str,
            *, workers: int = 8, max_count: int = 0, max_bytes: float = 256e6, max_side: int = 0, quality: int = 95,
            seed: int = 0) -> dict:
    """Convert image files (key = path under `base`, class) into shards + manifest with `workers` processes.

    Restartable: the plan (shuffled file list, samples per shard) is saved as `out_dir/.<split>.plan.json`
    and each finished shard leaves a `.<shard>.done` record, so a rerun with the same options writes only
    what is missing; both are removed once the manifest is written. An existing manifest is returned as is.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path, manifest_path = out_dir / f".{split}.plan.json", out_dir / f"{split}.json"
    base = str(Path(base).resolve())
    options = {"base": base, "max_count": max_count, "max_bytes": max_bytes, "max_side": max_side,
               "quality": quality, "seed": seed}
    if manifest_path.exists() and not plan_path.exists():
        log.info("%s exists: split %r is already converted (delete it to convert again)", manifest_path, split)
        return json.loads(manifest_path.read_text())
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan["options"] != options:
            raise ValueError(f"{plan_path}: an unfinished conversion with other options ({plan['options']}); rerun "
                             f"it with the same options to resume, or delete {plan_path} to start over")
        log.info("resuming the conversion planned in %s", plan_path)
    else:
        sources = list(sources)
        random.Random(seed).shuffle(sources)  # every shard mixes classes, which the shuffle buffer relies on
        per_shard = samples_per_shard(sources, base, max_count, int(max_bytes), max_side, quality, seed)
        plan = {"options": options, "classes": classes, "per_shard": per_shard, "sources": sources}
        _atomic_write_text(plan_path, json.dumps(plan))
    sources, per_shard, classes = plan["sources"], plan["per_shard"], plan["classes"]
    num_shards = math.ceil(len(sources) / per_shard)
    width = max(6, len(str(num_shards - 1)))

    def done_path(url):
        return out_dir / f".{url}.done"

    records, tasks = {}, []
    for index in range(num_shards):
        url = f"{split}-{index:0{width}d}.tar"
        if done_path(url).exists() and (out_dir / url).exists():
            records[index] = json.loads(done_path(url).read_text())
            continue
        first = index * per_shard
        tasks.append({"index": index, "url": url, "out_dir": str(out_dir), "classes": classes, "first": first,
                      "sources": sources[first:first + per_shard], "base": base, "max_side": max_side,
                      "quality": quality})
    log.info("%s: %d files, %d per shard: %d shards, %d already written, %d to write with %d workers",
             split, len(sources), per_shard, num_shards, len(records), len(tasks), workers)
    start = time.time()
    # forked workers (they see the parent's state); the executor, unlike Pool.terminate, waits for them on an error
    with ProcessPoolExecutor(max(1, workers), mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_convert_shard, task) for task in tasks]
        for n, record in enumerate((f.result() for f in as_completed(futures)), 1):
            _atomic_write_text(done_path(record["url"]), json.dumps(record))
            records[record["index"]] = record
            if n == len(tasks) or n % max(1, len(tasks) // 20) == 0:
                log.info("%d/%d shards written (%.0f samples/s)", n, len(tasks),
                         n * per_shard / max(time.time() - start, 1e-9))
    shards = [records[i] for i in range(num_shards)]
    for empty in (s for s in shards if s["count"] == 0):  # every file of it was bad
        (out_dir / empty["url"]).unlink()
    skipped = [item for s in shards for item in s["skipped"]]
    manifest = _write_manifest(out_dir, split, classes, [s for s in shards if s["count"]], source=base,
                               converted=sum(s["converted"] for s in shards), skipped=skipped)
    for s in shards:
        done_path(s["url"]).unlink()
    plan_path.unlink()
    return manifest


# ---------------------------------------------------------------- verification


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what is read through it."""

    def __init__(self, stream):
        self.stream, self.digest = stream, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.digest.update(data)
        buffer[:len(data)] = data
        return len(data)

    def hexdigest(self) -> str:
        for block in iter(lambda: self.stream.read(1 << 20), b""):  # the rest: tar padding
            self.digest.update(block)
        return self.digest.hexdigest()


def _check_sample(files: dict[str, bytes], decode: bool, labels: bool = True) -> str | None:
    """What is wrong with one sample's files, or None."""
    ext = next((e for e in IMAGE_KEYS if e in files), None)
    if ext is None:
        return f"no image (files: {sorted(files)})"
    if not files[ext]:
        return f"empty {ext} file"
    if labels and not files.get("cls", b"").strip().isdigit():
        return f"no class index (cls: {files.get('cls')!r})"
    if decode:
        try:
            to_rgb(Image.open(io.BytesIO(files[ext])))
        except Exception as err:
            return f"cannot decode {ext} ({err})"
    return None


def verify_shard(task: dict) -> dict:
    """Read one shard to its end: sha256, tar structure, every sample decodable; problems named by key."""
    url, expected, decode, labels = task["url"], task.get("count"), task["decode"], task.get("labels", True)
    problems, count = [], 0

    def report(key, files, reason):
        source = ""
        try:
            source = f" ({json.loads(files['json'])['key']})"
        except Exception:
            pass
        problems.append(f"{url}: sample {key}{source}: {reason}")

    try:
        stream = _HashingReader(wds.gopen(url, "rb"))
    except Exception as err:
        return {"url": url, "count": 0, "problems": [f"{url}: cannot open ({err})"]}
    key, files = None, {}
    try:
        with tarfile.open(fileobj=io.BufferedReader(stream), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, ext = key_and_extension(member.name)  # the training stream's key rule
                if prefix is None:
                    continue
                if prefix != key and key is not None:
                    reason = _check_sample(files, decode, labels)
                    count += 1
                    if reason:
                        report(key, files, reason)
                    files = {}
                key = prefix
                files[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{url}: truncated or unreadable tar after {count} samples ({err})")
        files = {}
    if files:
        count += 1
        reason = _check_sample(files, decode, labels)
        if reason:
            report(key, files, reason)
    if expected is not None and count != expected:
        problems.append(f"{url}: {count} samples, the manifest says {expected}")
    if task.get("sha256") and not problems and stream.hexdigest() != task["sha256"]:
        problems.append(f"{url}: sha256 differs from the manifest")
    return {"url": url, "count": count, "problems": problems}


def verify(spec: str, workers: int = 8, decode: bool = True, labels: bool = True) -> tuple[int, list[str]]:
    """Verify a manifest's shards (or a shard pattern's) in parallel: (samples read, problems).

    `labels=False` accepts samples without a class index (`cls`), as pretraining does.
    """
    tasks = []
    if spec.endswith(".json"):
        manifest = json.loads(Path(spec).read_text()) if Path(spec).is_file() else None
        if manifest is None:
            raise FileNotFoundError(f"manifest not found: {spec}")
        urls = resolve_shards(spec, key="verify").urls
        tasks = [{"url": u, "count": s["count"], "sha256": s.get("sha256"), "decode": decode, "labels": labels}
                 for u, s in zip(urls, manifest["shards"])]
    else:
        tasks = [{"url": u, "decode": decode, "labels": labels} for u in resolve_shards(spec, key="verify").urls]
    total, problems = 0, []
    with ProcessPoolExecutor(max(1, min(workers, len(tasks))), mp_context=multiprocessing.get_context("fork")) as pool:
        for result in pool.map(verify_shard, tasks):
            total += result["count"]
            problems += result["problems"]
    if spec.endswith(".json") and total != manifest["num_samples"]:
        problems.append(f"{spec}: {total} samples read, the manifest says {manifest['num_samples']}")
    return total, problems


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a Slurm allocation's), not the whole node's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
