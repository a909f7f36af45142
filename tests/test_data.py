import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.augment import SingleView
from data_pipeline.shards import folder_sources, sha256_file, write_shards
from data_pipeline.shards.__main__ import main as shards_main
from data_pipeline.stream import StreamLoader, resolve_shards


def jpeg_bytes(value: int, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_folder(root: Path, classes=("cat", "dog", "fish"), per_class=4) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"img_{i}.jpg").write_bytes(jpeg_bytes(40 * c + i))
    return root


def test_digits_manifest(digits_dir):
    train = json.loads((digits_dir / "train.json").read_text())
    val = json.loads((digits_dir / "val.json").read_text())
    assert train["num_samples"] + val["num_samples"] == 1797
    from sklearn.datasets import load_digits

    assert val["num_samples"] == sum(np.bincount(load_digits().target) // 5)  # every 5th image of each class
    assert train["classes"] == [str(c) for c in range(10)]
    for manifest in (train, val):
        assert sum(s["count"] for s in manifest["shards"]) == manifest["num_samples"]
        for shard in manifest["shards"]:
            assert sha256_file(digits_dir / shard["url"]) == shard["sha256"]


@pytest.mark.e2e
def test_folder_to_shards_cli(tmp_path):
    make_folder(tmp_path / "imgs")
    shards_main(["folder", str(tmp_path / "imgs"), str(tmp_path / "out"), "--split", "train", "--max-count", "5"])
    manifest = json.loads((tmp_path / "out" / "train.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "fish"]
    assert manifest["num_samples"] == 12
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    shards = resolve_shards(str(tmp_path / "out" / "train.json"))
    assert shards.num_samples == 12 and len(shards.urls) == 3
    # every source file is in the shards exactly once, with its class
    seen = {}
    for url in shards.urls:
        with tarfile.open(url) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    cls = int(tar.extractfile(member.name.replace(".json", ".cls")).read())
                    seen[meta["key"]] = (meta["label"], cls)
    assert len(seen) == 12
    assert all(Path(key).parent.name == label and ["cat", "dog", "fish"][cls] == label
               for key, (label, cls) in seen.items())


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        folder_sources(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"data.val: manifest not found: .*none.json"):
        resolve_shards(str(tmp_path / "none.json"), key="data.val")
    with pytest.raises(FileNotFoundError, match=r"data.train: shard not found: .*train-000000.tar \(2 of 2 missing\)"):
        resolve_shards(str(tmp_path / "train-{000000..000001}.tar"))


def bad_shards(tmp_path: Path) -> list[str]:
    """Two shards of 10 images each (classes 0..19), with a corrupt JPEG, an empty file, a truncated tar."""
    from data_pipeline.shards import Sample

    samples = [Sample(f"k{i}", jpeg_bytes(10 * i), "jpg", i, str(i)) for i in range(20)]
    samples[3].data = b"\xff\xd8 definitely not a jpeg"
    samples[7].data = b""
    write_shards(samples, tmp_path, "bad", [str(i) for i in range(20)], max_count=10)
    # cut the second shard in the middle of its 7th sample: samples 10..15 survive
    second = tmp_path / "bad-000001.tar"
    data = second.read_bytes()
    with tarfile.open(second) as tar:
        offset = [m for m in tar.getmembers() if m.name.startswith("000000016")][0].offset_data
    second.write_bytes(data[:offset + 20])
    return [str(tmp_path / "bad-000000.tar"), str(second)]


def test_corrupt_data_skipped_and_counted(tmp_path):
    urls = bad_shards(tmp_path)
    loader = StreamLoader(urls, SingleView(16), batch_size=1, resampled=False, shuffle_buffer=0, workers=0,
                          world_size=1)
    labels = []
    for batch in loader:
        labels.append(int(batch["labels"]))
        if len(labels) == 2 * 14:  # two epochs' worth of good samples
            break
    good = sorted(set(range(16)) - {3, 7})
    assert sorted(labels[:14]) == good and sorted(labels[14:]) == good
    assert loader.skipped >= 2 * 3  # per epoch: the corrupt JPEG, the empty file and the truncated tar


def epoch_labels(urls, rank, world_size, workers, batches):
    loader = StreamLoader(urls, SingleView(8), batch_size=2, rank=rank, world_size=world_size, seed=5,
                          resampled=False, shuffle_buffer=4, workers=workers)
    out = []
    for i, batch in enumerate(loader):
        out += batch["labels"].tolist()
        if i + 1 == batches:
            return out


def test_epoch_mode_reads_every_sample_once_across_ranks_and_workers(tmp_path):
    from data_pipeline.shards import Sample

    samples = [Sample(f"k{i}", jpeg_bytes(i), "jpg", i, str(i)) for i in range(32)]
    manifest = write_shards(samples, tmp_path, "e", [str(i) for i in range(32)], max_count=4)
    urls = [str(tmp_path / s["url"]) for s in manifest["shards"]]
    # 8 shards of 4 samples over 2 ranks x 2 workers: 2 shards = 8 samples = 4 batches per reader and epoch
    epoch = []
    for rank in range(2):
        epoch += epoch_labels(urls, rank, 2, 2, batches=8)
    assert sorted(epoch) == list(range(32))
    with pytest.raises(ValueError, match="epoch mode needs at least one shard per reader: 8 shards < world size 4 x"):
        StreamLoader(urls, SingleView(8), 2, world_size=4, resampled=False, workers=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly(digits_dir, workers):
    urls = resolve_shards(str(digits_dir / "train.json")).urls

    def loader(state=None):
        return StreamLoader(urls, SingleView(16, (0.3, 1.0), 0.5), batch_size=4, seed=3, shuffle_buffer=32,
                            workers=workers, state=state)

    full = []
    for i, batch in enumerate(loader()):
        full.append(batch)
        if i == 9:
            break
    first = loader()
    for i, _ in enumerate(first):
        if i == 4:
            break
    state = first.state_dict()
    assert first.samples_seen == 20
    resumed = []
    for i, batch in enumerate(loader(state)):
        resumed.append(batch)
        if i == 4:
            break
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    # and the stream is not constant: different batches differ
    assert not torch.equal(full[0]["images"], full[1]["images"])


@pytest.mark.parametrize("views, keys", [
    ("single", {"images": (4, 3, 16, 16)}),
    ("moco_v3", {"views": (4, 2, 3, 16, 16)}),
    ("simclr", {"views": (4, 2, 3, 16, 16)}),
    ("dino", {"views": (4, 2, 3, 16, 16), "local_views": (4, 3, 3, 8, 8)}),
])
def test_views_per_method(digits_dir, views, keys):
    from data_pipeline.augment import build_views
    from data_pipeline.batch import to_device
    from train.config import DataConfig

    data = DataConfig(views=views, local_crops=3, local_size=8)
    urls = resolve_shards(str(digits_dir / "train.json")).urls
    batch = next(iter(StreamLoader(urls, build_views(data, 16), batch_size=4)))
    assert {k: tuple(v.shape) for k, v in batch.items() if k != "labels"} == keys
    assert all(batch[k].dtype == torch.uint8 for k in keys)
    on_device = to_device(batch, torch.device("cpu"), data.mean, data.std)
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    for key in keys:  # normalised per channel, on every view
        expected = (batch[key].float() / 255 - mean) / std
        assert torch.allclose(on_device[key], expected)
    if views != "single":  # the two views of one image differ
        assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])
