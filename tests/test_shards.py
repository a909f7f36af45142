"""Shard tooling: parallel restartable conversion, odd and bad files, file lists, verification."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import shards
from data_pipeline.shards import convert, folder_sources, list_sources, verify
from data_pipeline.shards.__main__ import main


def image_bytes(value: int, size=(24, 18), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[:, : size[0] // 2] = 0  # left half transparent
        img = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def read_shards(out: Path, manifest: dict) -> dict[str, dict]:
    """source key -> {ext, data, cls, label, tar_key} over every shard of a manifest."""
    samples = {}
    for shard in manifest["shards"]:
        groups: dict[str, dict] = {}
        with tarfile.open(out / shard["url"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for tar_key, files in groups.items():
            meta = json.loads(files["json"])
            ext = next(e for e in ("jpg", "png") if e in files)
            assert meta["key"] not in samples, f"{meta['key']} written twice"
            samples[meta["key"]] = {"ext": ext, "data": files[ext], "cls": int(files["cls"]),
                                    "label": meta["label"], "tar_key": tar_key}
        assert len(groups) == shard["count"]
    return samples


def test_conversion_keeps_jpegs_converts_odd_images_and_lists_bad_files(tmp_path):
    root = tmp_path / "imagenet"
    files = {
        "n01/rgb.JPEG": image_bytes(50),
        "n01/gray.JPEG": image_bytes(90, mode="L"),
        "n01/png_named_jpeg.JPEG": image_bytes(120, fmt="PNG"),  # as ImageNet's n02105855_2933.JPEG
        "n02/cmyk.JPEG": image_bytes(160, mode="CMYK"),  # as ImageNet's 22 CMYK JPEGs
        "n02/alpha.png": image_bytes(200, mode="RGBA", fmt="PNG"),
        "n02/truncated.JPEG": image_bytes(30)[:300],
        "n02/empty.JPEG": b"",
        "n02/notes.txt": b"not an image",
        "n02/corrupt.JPEG": b"\xff\xd8\xff\xe0 garbage",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    sources, classes = folder_sources(root)
    assert classes == ["n01", "n02"] and len(sources) == len(files)
    manifest = convert(sources, classes, root, tmp_path / "out", "train", workers=2, max_count=2)
    assert manifest["num_samples"] == 5 and manifest["converted"] == 2
    assert all(0 < s["count"] <= 2 for s in manifest["shards"])  # a shard whose files were all bad is dropped
    skipped = {item["key"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == {"n02/truncated.JPEG", "n02/empty.JPEG", "n02/notes.txt", "n02/corrupt.JPEG"}
    assert skipped["n02/empty.JPEG"] == "empty file" and "not a readable image" in skipped["n02/notes.txt"]
    assert "truncated" in skipped["n02/truncated.JPEG"].lower()

    written = read_shards(tmp_path / "out", manifest)
    assert set(written) == {"n01/rgb.JPEG", "n01/gray.JPEG", "n01/png_named_jpeg.JPEG", "n02/cmyk.JPEG",
                            "n02/alpha.png"}
    for key, sample in written.items():
        assert sample["label"] == key.split("/")[0] and classes[sample["cls"]] == sample["label"]
    # original bytes where every decoder reads them, under the real format's extension
    assert written["n01/rgb.JPEG"]["data"] == files["n01/rgb.JPEG"] and written["n01/rgb.JPEG"]["ext"] == "jpg"
    assert written["n01/gray.JPEG"]["data"] == files["n01/gray.JPEG"]
    assert written["n01/png_named_jpeg.JPEG"]["ext"] == "png"
    assert written["n01/png_named_jpeg.JPEG"]["data"] == files["n01/png_named_jpeg.JPEG"]
    # CMYK and alpha become RGB JPEGs: the CMYK colours survive, transparency turns white
    cmyk = Image.open(io.BytesIO(written["n02/cmyk.JPEG"]["data"]))
    original = Image.open(io.BytesIO(files["n02/cmyk.JPEG"])).convert("RGB")
    assert (cmyk.format, cmyk.mode) == ("JPEG", "RGB")
    colour = np.asarray(cmyk, float).mean(axis=(0, 1)) - np.asarray(original, float).mean(axis=(0, 1))
    assert np.abs(colour).max() < 3  # per-channel means: an inverted or dropped CMYK channel is far off
    alpha = np.asarray(Image.open(io.BytesIO(written["n02/alpha.png"]["data"])), float)
    assert alpha[:, :10].mean() > 250 and alpha[:, 14:].mean() < 240
    # no plan or per-shard records are left behind; verify finds nothing wrong
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [s["url"] for s in manifest["shards"]] + ["train.json"])
    assert verify(str(tmp_path / "out" / "train.json"), workers=2) == (5, [])


def make_folder(root: Path, classes=("a", "b", "c"), per_class=10) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(image_bytes(20 * c + i))
    return root


REAL_CONVERT_SHARD = shards._convert_shard


def killed_midway(task):
    """_convert_shard that "is killed" from shard 4 on, leaving a half-written temporary file."""
    if task["index"] >= 4:
        (Path(task["out_dir"]) / f".{task['url']}.tmp").write_bytes(b"half a tar")
        raise RuntimeError("killed")
    return REAL_CONVERT_SHARD(task)


def test_conversion_resumes_after_a_kill_without_duplicates_or_losses(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    sources, classes = folder_sources(root)
    out = tmp_path / "out"
    monkeypatch.setattr(shards, "_convert_shard", killed_midway)  # worker processes are forked: they see it
    with pytest.raises(RuntimeError, match="killed"):
        convert(sources, classes, root, out, "train", workers=1, max_count=4)
    assert not (out / "train.json").exists() and (out / ".train.plan.json").exists()
    done = sorted(p.name for p in out.glob(".*.done"))
    assert done == [f".train-00000{i}.tar.done" for i in range(4)]
    first_shard = (out / "train-000000.tar").stat().st_mtime_ns
    # a shard renamed into place whose record was never written (killed in between) is written again
    (out / "train-000005.tar").write_bytes(b"stale")

    monkeypatch.setattr(shards, "_convert_shard", REAL_CONVERT_SHARD)
    manifest = convert(sources, classes, root, out, "train", workers=2, max_count=4)
    assert (out / "train-000000.tar").stat().st_mtime_ns == first_shard  # finished shards are not redone
    assert manifest["num_samples"] == 30 and [s["count"] for s in manifest["shards"]] == [4] * 7 + [2]
    written = read_shards(out, manifest)
    assert sorted(written) == sorted(key for key, _ in sources)  # every file exactly once
    assert sorted(int(s["tar_key"]) for s in written.values()) == list(range(30))
    assert not list(out.glob(".*"))  # plan, records and temporary files are gone
    assert verify(str(out / "train.json"), workers=2) == (30, [])
    # the options are part of the plan: resuming with others is refused with a clear message
    (out / "train.json").unlink()
    monkeypatch.setattr(shards, "_convert_shard", killed_midway)
    with pytest.raises(RuntimeError, match="killed"):
        convert(sources, classes, root, out, "train", workers=1, max_count=4)
    with pytest.raises(ValueError, match=r"\.train\.plan\.json: an unfinished conversion with other options"):
        convert(sources, classes, root, out, "train", workers=1, max_count=5)


def test_shard_size_target_and_max_side(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=8)
    sources, classes = folder_sources(root)
    mean = np.mean([len((root / key).read_bytes()) for key, _ in sources])
    manifest = convert(sources, classes, root, tmp_path / "out", "train", workers=1, max_bytes=3.5 * mean)
    assert [s["count"] for s in manifest["shards"]] == [3] * 8  # about max_bytes per shard
    # re-encoding to a longest side of 12 (the images are 24x18)
    small = convert(sources, classes, root, tmp_path / "small", "train", workers=1, max_side=12, quality=80)
    assert small["converted"] == 24
    images = read_shards(tmp_path / "small", small)
    assert {Image.open(io.BytesIO(s["data"])).size for s in images.values()} == {(12, 9)}


@pytest.mark.e2e
def test_file_list_and_csv_inputs(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "names.csv").write_text("path,label\nimgs/a/0.jpg,cat\nimgs/b/1.jpg,dog\n\"imgs/c/0.jpg\",cat\n")
    sources, classes = list_sources(tmp_path / "names.csv")
    assert classes == ["cat", "dog"] and sources == [("imgs/a/0.jpg", 0), ("imgs/b/1.jpg", 1), ("imgs/c/0.jpg", 0)]
    (tmp_path / "index.csv").write_text("a/0.jpg,3\nb/0.jpg,1\n")
    sources, classes = list_sources(tmp_path / "index.csv")
    assert classes == ["0", "1", "2", "3"] and sources == [("a/0.jpg", 3), ("b/0.jpg", 1)]
    (tmp_path / "plain.txt").write_text(f"{root}/a/1.jpg\n{root}/c/1.jpg\n")
    sources, classes = list_sources(tmp_path / "plain.txt")
    assert classes == ["a", "c"] and [cls for _, cls in sources] == [0, 1]
    (tmp_path / "bad.csv").write_text("a/0.jpg,1,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: expected 'path' or 'path,label'"):
        list_sources(tmp_path / "bad.csv")
    # the command line: relative paths under --root, a missing listed file is skipped and reported
    (tmp_path / "run.csv").write_text("a/0.jpg,cat\nb/0.jpg,dog\nb/9.jpg,dog\n")
    assert main(["list", str(tmp_path / "run.csv"), str(tmp_path / "out"), "--root", str(root), "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["num_samples"] == 2 and manifest["classes"] == ["cat", "dog"]
    assert [s["key"] for s in manifest["skipped"]] == ["b/9.jpg"]


def rewrite_member(tar_path: Path, member_name: str, data: bytes) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, content in members:
            content = data if member.name == member_name else content
            member.size = len(content)
            tar.addfile(member, io.BytesIO(content))


@pytest.mark.e2e
def test_verify_reports_bad_samples_by_key(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs", per_class=4)
    sources, classes = folder_sources(root)
    out = tmp_path / "out"
    manifest = convert(sources, classes, root, out, "train", workers=1, max_count=4)
    assert main(["verify", str(out / "train.json"), "--workers", "2"]) == 0
    written = read_shards(out, manifest)
    victim = next(key for key, s in written.items() if s["tar_key"] == "000000001")
    rewrite_member(out / "train-000000.tar", "000000001.jpg", b"\xff\xd8 broken")  # a corrupt image
    second = out / "train-000001.tar"
    second.write_bytes(second.read_bytes()[:2000])  # a truncated tar
    assert main(["verify", str(out / "train.json"), "--workers", "2"]) == 1
    report = capsys.readouterr().out
    assert f"train-000000.tar: sample 000000001 ({victim}): " in report and "cannot decode jpg" in report
    assert "train-000001.tar: truncated or unreadable tar after" in report
    assert "train-000000.tar: sha256 differs from the manifest" not in report  # the decode problem says enough
    total, problems = verify(str(out / "train.json"), workers=1, decode=False)
    assert total < 12 and any("samples, the manifest says 4" in p for p in problems)
    # without decoding, the broken image is caught by the checksum only
    first = [p for p in problems if "train-000000" in p]
    assert first == [f"{out / 'train-000000.tar'}: sha256 differs from the manifest"]
