"""Streaming at scale: pipe/brace URLs, exact-once evaluation across ranks, decode on the device, bad input."""

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline.augment import DeviceSingleView, SingleView, build_views
from data_pipeline.shards import Sample, write_shards
from data_pipeline.stream import EvalStream, StreamLoader, resolve_shards
from train.config import ConfigError, DataConfig
from train.recipe import load_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(seed: int, size=(40, 30), mode="RGB", fmt="JPEG") -> bytes:
    """A smooth random colour image with some texture (what JPEG is made for), encoded."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.clip(np.asarray(low, float) + rng.normal(0, 6, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[: size[1] // 2] = 0  # top half transparent
        img = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=92)
    return buf.getvalue()


def numbered_shards(tmp_path: Path, n: int, per_shard: int) -> list[str]:
    samples = [Sample(f"k{i}", photo(i, (12, 10)), "jpg", i, str(i)) for i in range(n)]
    manifest = write_shards(samples, tmp_path, "s", [str(i) for i in range(n)], max_count=per_shard)
    return [str(tmp_path / s["url"]) for s in manifest["shards"]]


def test_pipe_and_brace_urls_stream_every_sample(tmp_path):
    numbered_shards(tmp_path, 12, 3)
    shards = resolve_shards(f"pipe:cat {tmp_path}/s-{{000000..000003}}.tar")
    assert shards.urls == [f"pipe:cat {tmp_path}/s-{i:06d}.tar" for i in range(4)]
    loader = StreamLoader(shards.urls, SingleView(8), batch_size=3, resampled=False, shuffle_buffer=0)
    labels = [label for _, batch in zip(range(4), loader) for label in batch["labels"].tolist()]
    assert sorted(labels) == list(range(12)) and loader.skipped == 0


def test_fewer_shards_than_readers(tmp_path, caplog):
    urls = numbered_shards(tmp_path, 6, 3)
    with pytest.raises(ValueError, match=r"epoch mode needs at least one shard per reader: 2 shards < world size 2 x "
                                         r"data.workers 2; write more shards, lower data.workers, or set data.resampl"):
        StreamLoader(urls, SingleView(8), 2, world_size=2, resampled=False, workers=2)
    caplog.set_level("WARNING")
    StreamLoader(urls, SingleView(8), 2, world_size=2, resampled=True, workers=2)
    assert "2 shards for 4 readers (world size 2 x data.workers 2): readers often read the same shard" in caplog.text


@pytest.mark.parametrize("shards, world_size, workers", [(8, 2, 2), (3, 2, 2), (2, 3, 0), (5, 3, 0)])
def test_eval_stream_reads_every_sample_exactly_once_across_ranks(tmp_path, shards, world_size, workers):
    urls = numbered_shards(tmp_path, 5 * shards, 5)
    labels = []
    for rank in range(world_size):
        stream = EvalStream(urls, SingleView(8), batch_size=2, rank=rank, world_size=world_size)
        for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers):
            labels += batch["labels"].tolist()
    assert sorted(labels) == list(range(5 * shards))


def decoded_pair(samples: list[dict], seed: int, img_size: int, hflip: float):
    """The CPU path's and the device path's (on CPU) uint8 views of `samples` from the same per-sample seeds."""
    from data_pipeline.augment import decode_image

    cpu, device_view = SingleView(img_size, (0.2, 1.0), hflip), DeviceSingleView(img_size, (0.2, 1.0), hflip)
    cpu_images, packed = [], []
    for i, sample in enumerate(samples):
        torch.manual_seed(seed + i)
        cpu_images.append(cpu(decode_image(sample))["images"])
        torch.manual_seed(seed + i)
        packed.append({**device_view.from_sample(sample), "labels": i})
    batch = device_view.to_device(device_view.collate(packed), torch.device("cpu"), MEAN, STD)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return torch.stack(cpu_images), (batch["images"] * std + mean) * 255, batch


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_device_decode_matches_the_cpu_path(hflip):
    kinds = [("jpg", "RGB", "JPEG"), ("jpg", "L", "JPEG"), ("jpg", "CMYK", "JPEG"), ("png", "RGBA", "PNG"),
             ("png", "RGB", "PNG")] * 2
    samples = [{"__key__": f"{i}", ext: photo(i, (60 + 7 * i, 45 + 3 * i), mode, fmt)}
               for i, (ext, mode, fmt) in enumerate(kinds)]
    cpu, device, batch = decoded_pair(samples, seed=11, img_size=24, hflip=hflip)
    assert device.shape == cpu.shape == (10, 3, 24, 24) and batch["images"].dtype == torch.float32
    assert batch["labels"].tolist() == list(range(10)) and batch["_skipped"] == 0
    diff = (device - cpu.float()).abs()
    # the same crops and flips; only PIL's and torch's bicubic antialiasing round differently
    assert diff.max() <= 4 and diff.mean() < 0.5
    # a different seed gives different crops (the comparison above is not trivially true)
    other, _, _ = decoded_pair(samples, seed=12, img_size=24, hflip=hflip)
    assert (other.float() - cpu.float()).abs().mean() > 5


def test_device_decode_replaces_and_counts_an_undecodable_jpeg():
    good = [{"__key__": f"{i}", "jpg": photo(i)} for i in range(3)]
    broken = bytearray(photo(7))
    dht = broken.index(b"\xff\xc4")  # a corrupt Huffman table: the header parses, decoding fails
    broken[dht + 5:dht + 25] = b"\xff" * 20
    samples = good[:1] + [{"__key__": "bad", "jpg": bytes(broken)}] + good[1:]
    view = DeviceSingleView(16)
    packed = [{**view.from_sample(s), "labels": i} for i, s in enumerate(samples)]
    batch = view.to_device(view.collate(packed), torch.device("cpu"), MEAN, STD)
    assert batch["_skipped"] == 1 and batch["images"].shape == (4, 3, 16, 16)
    # the broken sample's slot holds another sample of the batch, with that sample's label
    source = batch["labels"][1].item()
    assert source in (0, 2, 3) and torch.equal(batch["images"][1], batch["images"][source])


def odd_shard(path: Path) -> set[int]:
    """A shard of awkward samples, bad and good in turn (good last); returns the good labels."""
    cases = [
        (4, "jpg", photo(4)[:400]),  # truncated JPEG
        (0, "jpg", photo(0)),  # plain RGB JPEG
        (5, "jpg", b"this is text, not an image"),
        (1, "jpg", photo(1, mode="CMYK")),
        (6, "txt", b"a sample without any image"),
        (2, "jpg", photo(2, mode="L")),
        (7, "jpg", b""),  # zero-byte file
        (3, "png", photo(3, mode="RGBA", fmt="PNG")),
    ]
    with wds.TarWriter(str(path)) as writer:
        for label, ext, data in cases:
            writer.write({"__key__": f"{label:06d}", ext: data, "cls": label})
    return {0, 1, 2, 3}


@pytest.mark.parametrize("device_decode", [False, True])
def test_bad_input_is_skipped_and_counted_on_both_paths(tmp_path, device_decode):
    good = odd_shard(tmp_path / "odd-000000.tar")
    views = (DeviceSingleView if device_decode else SingleView)(16)

    def loader(urls):
        return StreamLoader(urls, views, batch_size=1, resampled=False, shuffle_buffer=0, world_size=1,
                            device=torch.device("cpu"), mean=MEAN, std=STD)

    samples = loader([str(tmp_path / "odd-000000.tar")])
    seen = {batch["labels"].item(): batch["images"][0] for _, batch in zip(range(4), samples)}
    assert set(seen) == good and samples.skipped == 4  # truncated, not an image, no image, empty
    image = seen[3] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert image.shape == (3, 16, 16) and image.max() > 0.97  # the PNG's transparent half is white
    # broken shards: a tar cut inside its second sample's image, and a zero-byte tar
    write_shards([Sample(f"k{i}", photo(i, (12, 10)), "jpg", 100 + i, "x") for i in range(3)], tmp_path, "t", [])
    with tarfile.open(tmp_path / "t-000000.tar") as tar:
        cut = next(m for m in tar.getmembers() if m.name == "000000001.jpg").offset_data + 20
    (tmp_path / "odd-000001.tar").write_bytes((tmp_path / "t-000000.tar").read_bytes()[:cut])
    (tmp_path / "odd-000002.tar").write_bytes(b"")
    samples = loader([str(tmp_path / f"odd-{i:06d}.tar") for i in range(3)])
    labels = [batch["labels"].item() for _, batch in zip(range(10), samples)]  # two passes
    assert sorted(labels) == sorted(2 * (list(good) + [100]))  # every readable sample once per pass
    # a pass skips 4 bad samples + the cut tar (its end and its half sample) + the zero-byte tar; the count
    # a batch carries includes every skip before it, so after two passes at least one full pass is in
    assert 8 <= samples.skipped <= 16


def test_device_path_resumes_exactly_and_counts_in_the_checkpoint(digits_dir):
    """The loader holds one prepared batch ahead; the checkpointed position must be that of the batches handed out."""
    urls = resolve_shards(str(digits_dir / "train.json")).urls

    def loader(state=None):
        return StreamLoader(urls, DeviceSingleView(16, (0.3, 1.0)), batch_size=4, seed=3, shuffle_buffer=32,
                            workers=0, state=state, device=torch.device("cpu"), mean=MEAN, std=STD)

    full = [b for _, b in zip(range(8), loader())]
    first = loader()
    for i, _ in enumerate(first):
        if i == 3:
            break
    state = first.state_dict()
    assert first.samples_seen == 16 and state["device_skipped"] == 0
    resumed = [b for _, b in zip(range(4), loader(state))]
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(full[0]["images"], full[1]["images"])


def test_views_follow_the_official_recipes_and_are_configurable():
    from data_pipeline.augment import DeviceMultiView, MultiView, ViewRecipe

    single = build_views(DataConfig(), 224)
    assert isinstance(single, SingleView) and single.crop_scale == (0.2, 1.0)  # MAE
    moco = build_views(DataConfig(views="moco_v3"), 224)
    first, second = moco.groups["views"]
    # main_moco.py: crop_min 0.08, bilinear, jitter (0.4, 0.4, 0.2, 0.1) p 0.8, gray 0.2, blur 1 / 0.1, solarize 0 / 0.2
    assert first == ViewRecipe(224, (0.08, 1.0), "bilinear", (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0)
    assert second == ViewRecipe(224, (0.08, 1.0), "bilinear", (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2)
    assert first.sigma == (0.1, 2.0) and first.hflip == 0.5 and first.ratio == (3 / 4, 4 / 3)
    simclr = build_views(DataConfig(views="simclr", jitter_strength=0.5), 224)
    assert simclr.groups["views"] == [ViewRecipe(224, (0.08, 1.0), "bicubic", (0.4, 0.4, 0.4, 0.1), blur_p=0.5)] * 2
    dino = build_views(DataConfig(views="dino", local_crops=6, local_size=96, crop_scale=(0.25, 1.0)), 224)
    assert [r.blur_p for r in dino.groups["views"]] == [1.0, 0.1] and dino.groups["views"][0].scale == (0.25, 1.0)
    assert [r.solarize_p for r in dino.groups["views"]] == [0.0, 0.2]
    assert dino.groups["local_views"] == [ViewRecipe(96, (0.05, 0.4), "bicubic", blur_p=0.5)] * 6
    assert build_views(DataConfig(views="dino"), 224).groups["views"][1].scale == (0.4, 1.0)
    assert "local_views" not in build_views(DataConfig(views="dino", local_crops=0), 32).groups
    assert isinstance(build_views(DataConfig(decode="gpu"), 16), DeviceSingleView)
    assert isinstance(build_views(DataConfig(decode="auto"), 16, torch.device("cpu")), SingleView)  # auto-off on CPU
    for views in ("moco_v3", "simclr", "dino"):
        assert isinstance(build_views(DataConfig(views=views, decode="gpu"), 16), DeviceMultiView)
        assert type(build_views(DataConfig(views=views), 16, torch.device("cpu"))) is MultiView
    tiny = ["model.img_size=32", "model.patch_size=4", "model.embed_dim=32", "model.num_heads=2", "train.steps=1"]
    cfg = load_config(None, tiny + ["data.views=dino", "data.jitter_strength=0.5", "data.local_crops=2"])
    assert cfg.data.crop_scale is None and cfg.data.jitter_strength == 0.5
    with pytest.raises(ConfigError, match="data.decode='nvjpeg': choose one of"):
        load_config(None, tiny + ["data.decode=nvjpeg"])
    with pytest.raises(ConfigError, match="data.decode=gpu: data.views='finetune' .RandAugment. runs in the CPU"):
        load_config(None, tiny + ["data.decode=gpu", "data.views=finetune"])
    assert load_config(None, tiny + ["data.decode=gpu", "data.views=dino"]).data.decode == "gpu"


@pytest.mark.e2e
def test_skipped_samples_reach_tensorboard(make_cfg, tmp_path):
    """Through the engine with decoding in the training process (the GPU path's code, here on the CPU)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from helpers import read_metrics
    from train.engine import train
    from train.methods import build_method

    samples = [Sample(f"k{i}", photo(i, (20, 20)), "jpg", i % 4, str(i % 4)) for i in range(40)]
    for i in (3, 17, 29):
        samples[i].data = b"" if i == 3 else photo(i)[:300]  # an empty and two truncated files per pass
    write_shards(samples, tmp_path / "bad", "train", [str(c) for c in range(4)], max_count=10)
    cfg = make_cfg("train.steps=6", f"data.train={tmp_path / 'bad' / 'train.json'}", "data.decode=gpu",
                   name="skips")
    train(cfg, build_method)
    rows = read_metrics(cfg.output_dir)
    assert rows[6]["data/samples_seen"] == 48  # 48 good samples read: one full pass of 37 and more
    assert rows[6]["data/skipped"] >= 3
    events = EventAccumulator(str(cfg.output_dir / "tb"))
    events.Reload()
    logged = [e.value for e in events.Scalars("data/skipped")]
    assert logged == [rows[s]["data/skipped"] for s in sorted(rows)] and logged == sorted(logged)


@pytest.mark.e2e
def test_data_throughput_benchmark_prints_its_table(tmp_path, capsys):
    from benchmarks.data_throughput import main, synthetic_jpeg

    assert 80_000 < len(synthetic_jpeg(0)) < 140_000  # ImageNet-like: 500x375, about 110 KB
    rows = main(["--dir", str(tmp_path), "--images", "8", "--shard-size", "4", "--source-size", "64x48",
                 "--img-size", "32", "--batch-size", "4", "--workers", "0,1", "--seconds", "0.2", "--warmup", "1",
                 "--repeats", "1"])
    assert [(r["path"], r["workers"]) for r in rows][:4] == [("cpu", 0), ("cpu", 1), ("gpu-workers", 0),
                                                             ("gpu-workers", 1)]
    assert all(r["img_s"] > 0 for r in rows)
    assert rows[-1]["path"] == "official" and rows[-1]["ratio"] > 0
    out = capsys.readouterr().out
    assert "target: 3 x 2600 img/s (MAE ViT-L on one H100) = 7800 img/s" in out
    assert "cpu on a 16-core node, extrapolated:" in out
    assert "per core, single: ours / official recipe = " in out and "target >= 1.0x: " in out
    # a multi-view recipe: the official DINO pipeline beside ours, and the device path's worker side
    rows = main(["--dir", str(tmp_path), "--images", "8", "--shard-size", "4", "--source-size", "64x48", "--views",
                 "dino", "--img-size", "32", "--batch-size", "2", "--workers", "0", "--seconds", "0.05",
                 "--warmup", "1", "--repeats", "2"])
    assert [r["path"] for r in rows] == ["cpu", "gpu-workers", "official"] and len(rows[-1]["runs"]) == 2
    out = capsys.readouterr().out
    assert "per core, dino: ours / official recipe = " in out
    assert "target: GPU path >= 3 x the training step on one GPU (img/s): unmeasured" in out


def read_one(it, loader) -> tuple[int, int]:
    """(segment, label) of the next batch of one sample: the segment from the position it committed."""
    label = next(it)["labels"].item()
    return loader.positions[(loader.next_reader - 1) % loader.readers][0], label


@pytest.mark.parametrize("layouts, old_epochs", [([(3, 0, 16), (2, 0, 9), (1, 0, 0)], 2),
                                                 ([(1, 0, 30), (2, 2, 0)], 1), ([(4, 0, 7), (1, 2, 0)], 1)])
def test_epoch_mode_continues_on_another_layout_reading_each_sample_once_per_epoch(tmp_path, layouts, old_epochs):
    """Epoch mode resumed on other layouts ((world size, data.workers, batches read) in turn): the carried-over
    segments finish the old readers' epochs, so up to the last of them every sample is read exactly once per
    epoch (counted by label); a same-layout resume inside a carried-over segment continues it exactly.
    `old_epochs`: in how many epochs the old readers were at the first change of layout. After the first layout
    the shards move to another directory, as a requeued job's node-local copy would."""
    first = numbered_shards(tmp_path, 47, 4)  # 12 shards: 11 of 4 samples, 1 of 3
    (tmp_path / "moved").mkdir()
    moved = [shutil.copy(url, tmp_path / "moved") for url in first]

    def loaders(world, workers, states):
        if states is not None:  # the old copies are gone
            for url in first:
                Path(url).unlink(missing_ok=True)
        urls = first if states is None else moved
        return [StreamLoader(urls, SingleView(8), 1, rank=r, world_size=world, seed=5, resampled=False,
                             shuffle_buffer=4, workers=workers,
                             state=None if states is None else states[r] if len(states) == world and
                             states[0]["readers"] == max(1, workers) else states) for r in range(world)]

    read, states, carried = [], None, set()
    for number, (world, workers, batches) in enumerate(layouts):
        current = loaders(world, workers, states)
        streams = [iter(lo) for lo in current]
        if states is not None:
            carried.add(current[0].stream.carried["segment"])
            plans = [lo.stream.carried["pieces"] for lo in current]
            if number == 1:  # the first change of layout met the cases that need the replay
                assert len({p[0] for s in states for p in s["positions"].values()}) == old_epochs
                assert any(keys for plan in plans for pieces in plan.values() for _, keys in pieces)  # part-read
        if batches:
            read += [read_one(it, lo) for _ in range(batches) for it, lo in zip(streams, current)]
            states = [lo.state_dict() for lo in current]
            continue
        # the last layout: a same-layout resume part-way through the carried-over segment is exact
        read += [read_one(it, lo) for _ in range(3) for it, lo in zip(streams, current)]
        resumed = loaders(world, workers, [lo.state_dict() for lo in current])
        ahead = [read_one(it, lo) for _ in range(3) for it, lo in zip(streams, current)]
        streams = [iter(lo) for lo in resumed]
        assert [read_one(it, lo) for _ in range(3) for it, lo in zip(streams, resumed)] == ahead
        read += ahead
        last = max(carried)
        while any(p[0] <= last for lo in resumed for p in lo.positions.values()):
            read += [read_one(it, lo) for it, lo in zip(streams, resumed)]
    epochs = [s for s in range(last) if s not in carried]
    counts = Counter(label for segment, label in read if segment <= last)
    assert counts == {label: len(epochs) for label in range(47)}, (epochs, carried)


def test_a_new_layout_never_repeats_reader_seeds_and_keeps_the_counts():
    """Two old ranks' resampled streams continued by one or three ranks: every new reader starts after the highest
    segment of any old reader (rank 1's here, which rank 0's own state does not show); the skips are counted once
    and the samples read are shared out over the new ranks."""
    old = [{"positions": {0: [3, 5, 1]}, "next_reader": 0, "readers": 1, "world_size": 2, "batches": 6,
            "batch_size": 8, "device_skipped": 2},
           {"positions": {0: [9, 2, 4]}, "next_reader": 0, "readers": 1, "world_size": 2, "batches": 6,
            "batch_size": 8, "device_skipped": 1}]
    for world in (1, 3):
        loaders = [StreamLoader(["unused.tar"], SingleView(16), 4, rank=r, world_size=world, workers=2, state=old)
                   for r in range(world)]
        assert all(p[:2] == (10, 0) for lo in loaders for p in lo.positions.values())
        assert sum(lo.skipped for lo in loaders) == 1 + 4 + 2 + 1
        assert [lo.samples_seen for lo in loaders] == [2 * 6 * 8 // world] * world
    with pytest.raises(ValueError, match=r"state of 2 ranks x 1 readers for 1 x 2 \(or of another shard list\)"):
        StreamLoader(["unused.tar"], SingleView(16), 4, workers=2, state=old[0])


def test_epoch_mode_on_another_shard_list_or_mode_starts_a_new_epoch(tmp_path, caplog):
    """A checkpoint's epoch positions index into its shard list's permutations: with a shard removed (or from a
    resampled run) they mean nothing, so the stream says so in one line and starts the next epoch instead of
    misreading the old one."""
    urls = numbered_shards(tmp_path, 47, 4)
    old = StreamLoader(urls, SingleView(8), 1, seed=5, resampled=False, shuffle_buffer=4)
    batches = iter(old)
    for _ in range(30):
        next(batches)
    state = old.state_dict()
    with pytest.raises(ValueError, match="give every old rank's state"):
        StreamLoader(urls[:-1], SingleView(8), 1, seed=5, resampled=False, state=state)
    with caplog.at_level("WARNING", logger="data_pipeline.stream"):
        new = StreamLoader(urls[:-1], SingleView(8), 1, seed=5, resampled=False, state=[state])
    assert "the shard list (data.train) or data.resampled changed: the rest of the old epoch cannot be found, a new" \
        " epoch starts" in caplog.text
    assert new.positions == {0: (1, 0, 0)} and new.stream.carried is None and new.samples_seen == 30
    # resampled segments are no epochs: switching to epoch mode starts one, after them
    resampled = StreamLoader(urls, SingleView(8), 1, seed=5, shuffle_buffer=4)
    batches = iter(resampled)
    for _ in range(30):
        next(batches)
    with pytest.raises(ValueError, match="give every old rank's state"):
        StreamLoader(urls, SingleView(8), 1, seed=5, resampled=False, state=resampled.state_dict())
    switched = StreamLoader(urls, SingleView(8), 1, seed=5, resampled=False, state=[resampled.state_dict()])
    assert switched.positions == {0: (resampled.positions[0][0] + 1, 0, 0)} and switched.stream.carried is None
