import json
import os
import shutil
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
    "mlo_mae": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
                "method.mask_net_hidden=16", "method.mask_net_dim=16", "method.mask_net_depth=1",
                "method.mask_net_heads=2", "method.hyper_every=1",
                "method.head_base_lr=0.5", "method.mask_base_lr=0.5"],
    "mapet": ["method.num_visible=4", "method.num_codes=16", "method.teacher.num_heads=2"],
    "digpt": ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2",
              "method.teacher.num_heads=2"],
    "moco_v3": ["data.views=moco_v3", "method.proj_dim=16", "method.mlp_dim=32"],
    "simclr": ["data.views=simclr", "method.proj_hidden_dim=32", "method.proj_dim=16"],
    "dino": ["data.views=dino", "data.local_crops=2", "data.local_size=8", "data.local_crop_scale=[0.2,0.5]",
             "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"],
}

# a tiny CLIP image tower: timm's vit_base_patch16_clip_224 layout (pre-norm, LayerNorm eps 1e-5) at 16 px,
# 4 px patches, width 32, 2 blocks, 2 heads, a 24-d output projection
TINY_CLIP = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=24)


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


def timm_to_openai_clip(state: dict) -> dict:
    """A timm CLIP tower's state dict under OpenAI / open_clip names (`visual.*`), as their checkpoints hold it."""
    names = [("patch_embed.proj", "conv1"), ("norm_pre", "ln_pre"), ("blocks.", "transformer.resblocks."),
             ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.qkv.", "attn.in_proj_"), ("attn.proj", "attn.out_proj"),
             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
    out = {}
    for key, value in state.items():
        if key == "cls_token":
            key, value = "class_embedding", value.flatten()
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key == "head.weight":
            key, value = "proj", value.T
        elif key == "head.bias":
            assert not value.any()  # CLIP's projection has no bias
            continue
        elif key.startswith("norm."):
            key = key.replace("norm.", "ln_post.")
        for ours, theirs in names:
            key = key.replace(ours, theirs)
        out["visual." + key] = value.clone()
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
    from train.config import load_config

    def make(*overrides, world_size: int = 1, name: str = "run"):
        base = tiny_overrides(overrides) + [f"run.output_dir={tmp_path / name}",
                                            f"data.train={digits_dir / 'train.json'}",
                                            f"data.val={digits_dir / 'val.json'}"]
        return load_config(None, base + list(overrides), world_size=world_size)

    return make


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run as step -> values (lines of the same step merged, later values win)."""
    rows = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def seed_checkpoint(cfg, source_dir: Path, step: int) -> None:
    """Give run `cfg` a copy of `source_dir`'s step-`step` checkpoint as its latest, so train(cfg) resumes there."""
    from train.checkpoint import tag_for

    tag = tag_for(step)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    shutil.copytree(Path(source_dir) / "checkpoints" / tag, ckpts / tag)
    (ckpts / "latest").write_text(tag)
