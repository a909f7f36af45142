"""The batch contract's shapes: what the planner traces and the benchmarks feed equals what the loader yields."""

import pytest
import torch

from data_pipeline.augment import build_views
from data_pipeline.batch import synthetic_batch
from data_pipeline.stream import StreamLoader, resolve_shards
from train.planning import meta_batch


@pytest.mark.parametrize("views", ["single", "finetune", "mapet", "moco_v3", "simclr", "dino"])
def test_synthetic_and_meta_batches_have_the_loaders_shapes(make_cfg, views):
    local = ["data.local_crops=2", "data.local_size=8"] if views == "dino" else []
    overrides = ["train.steps=1", f"data.views={views}", *local]
    cfg = make_cfg(*overrides)
    d, size = cfg.data, cfg.model.img_size
    loader = StreamLoader(resolve_shards(d.train).urls, build_views(d, size), d.batch_size, shuffle_buffer=8,
                          device=torch.device("cpu"), mean=d.mean, std=d.std)
    real = next(iter(loader))
    shapes = {k: tuple(v.shape) for k, v in real.items()}
    assert {k: tuple(v.shape) for k, v in synthetic_batch(d, size, torch.device("cpu")).items()} == shapes
    assert {k: tuple(v.shape) for k, v in meta_batch(cfg, d.batch_size).items()} == shapes
    assert ("teacher_images" in shapes) == (views == "mapet") and ("local_views" in shapes) == (views == "dino")
