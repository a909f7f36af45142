"""Fixtures every test module can use (the plain helpers are in helpers.py; tiny per-method settings in tiny/)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from helpers import TINY_CLIP, timm_to_openai_clip, tiny_overrides  # noqa: E402 (after DS_ACCELERATOR)


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits data set written once as shards (train.json / val.json manifests)."""
    from data_pipeline.shards import build_digits_shards

    out = tmp_path_factory.mktemp("digits")
    build_digits_shards(out)
    return out


@pytest.fixture(scope="session")
def clip_teacher(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP image tower (TINY_CLIP) saved as an OpenAI / open_clip checkpoint."""
    import timm
    import torch

    torch.manual_seed(1234)
    tower = timm.create_model("vit_base_patch16_clip_224", pretrained=False, **TINY_CLIP)
    path = tmp_path_factory.mktemp("teacher") / "open_clip_tiny.bin"
    torch.save(timm_to_openai_clip(tower.state_dict()), path)
    return path


@pytest.fixture
def make_cfg(tmp_path, digits_dir):
    """A validated tiny config writing into tmp_path; extra dotted overrides win."""
    from train.recipe import load_config

    def make(*overrides, world_size: int = 1, name: str = "run"):
        base = tiny_overrides(overrides) + [f"run.output_dir={tmp_path / name}",
                                            f"data.train={digits_dir / 'train.json'}",
                                            f"data.val={digits_dir / 'val.json'}"]
        return load_config(None, base + list(overrides), world_size=world_size)

    return make


@pytest.fixture(scope="module")
def codebook(tmp_path_factory, clip_teacher, digits_dir):
    """16 k-CLIP codes fit by the codebook command on the tiny teacher's features of the digits."""
    from train.teachers.codebook import main as codebook_main

    path = tmp_path_factory.mktemp("codebook") / "kclip16.pt"
    rc = codebook_main(["--out", str(path), "--max-patches", "4000", "--workers", "0", "--batch-size", "200",
                        "--init", "kmeans++",  # better-spread codes: the 10-step ZeRO run learns clearly
                        *tiny_overrides(["method.name=mapet"]), "method.name=mapet", "train.steps=1",
                        f"method.teacher.path={clip_teacher}", f"data.train={digits_dir / 'train.json'}"])
    assert rc == 0
    return path


@pytest.fixture
def mapet_cfg(make_cfg, clip_teacher, codebook):
    """A tiny MaPeT config with the tiny teacher and codebook."""
    def make(*overrides, name="mapet"):
        return make_cfg("method.name=mapet", f"method.teacher.path={clip_teacher}", f"method.codebook={codebook}",
                        "train.steps=1", *overrides, name=name)
    return make
