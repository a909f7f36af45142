import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]

# A tiny run: 16x16 images, 4x4 patches, 2 blocks of width 32. A step takes milliseconds on CPU.
TINY = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=64", "data.crop_scale=[0.5,1.0]",
    "optim.base_lr=5e-2", "optim.warmup_steps=2", "run.log_every=1", "eval.at_end=false",
]


# method-specific tiny settings, applied by make_cfg when the run selects that method
TINY_METHOD = {
    "mae": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
    "hpm": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"],
}


def tiny_overrides(overrides=()) -> list[str]:
    """TINY plus the tiny settings of the method named in `overrides` (MAE when none is named)."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("method.name=")]
    return TINY + TINY_METHOD.get(names[-1] if names else "mae", [])


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The embedded digits data set written once as shards (train.json / val.json manifests)."""
    from data_pipeline.shards import build_digits_shards

    out = tmp_path_factory.mktemp("digits")
    build_digits_shards(out)
    return out


@pytest.fixture
def make_cfg(tmp_path, digits_dir):
    """A validated tiny config writing into tmp_path; extra dotted overrides win."""
    from train.config import load_config

    def make(*overrides, world_size: int = 1, name: str = "run"):
        base = tiny_overrides(overrides) + [f"run.output_dir={tmp_path / name}",
                                            f"data.train={digits_dir / 'train.json'}",
                                            f"data.val={digits_dir / 'val.json'}"]
        return load_config(None, base + list(overrides), world_size=world_size)

    return make


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run as step -> values (the last line of a step wins)."""
    rows = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows
