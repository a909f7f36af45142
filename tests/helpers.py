"""What several test modules share (plain functions; the fixtures are in conftest.py)."""

import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from timm.models.byobnet import ByoBlockCfg, ByobNet, model_cfgs

from data_pipeline.augment import SingleView
from data_pipeline.batch import to_device
from data_pipeline.stream import StreamLoader, resolve_shards
from train.checkpoint import tag_for
from train.distributed import free_port
from train.engine import steps_per_epoch_for, train
from train.methods import build_method
from train.optim import lr_at, param_groups, set_lr

REPO = Path(__file__).resolve().parents[1]
TINY_DIR = Path(__file__).resolve().parent / "tiny"

# A tiny run: 16x16 images, 4x4 patches, 2 blocks of width 32. A step takes milliseconds on CPU.
TINY = [
    "model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "data.batch_size=8", "data.workers=0", "data.shuffle_buffer=64", "data.crop_scale=[0.5,1.0]",
    "optim.base_lr=5e-2", "optim.warmup_steps=2", "run.log_every=1", "eval.at_end=false",
]

# a tiny CLIP image tower: timm's vit_base_patch16_clip_224 layout (pre-norm, LayerNorm eps 1e-5) at 16 px,
# 4 px patches, width 32, 2 blocks, 2 heads, a 24-d output projection
TINY_CLIP = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=24)


class InfiniteGradient(torch.autograd.Function):
    """The identity with an infinite gradient: a finite loss whose step DeepSpeed skips as an overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def dotted(tree: dict, prefix: str = "") -> list[str]:
    """A nested config mapping as `a.b=value` overrides."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value) if isinstance(value, list | bool) else value}")
    return out


def tiny_overrides(overrides=()) -> list[str]:
    """TINY plus the tiny settings of the method named in `overrides` (MAE when none is named):
    tests/tiny/<method>.yaml, when that method has one."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("method.name=")]
    path = TINY_DIR / f"{names[-1] if names else 'mae'}.yaml"
    return TINY + (dotted(yaml.safe_load(path.read_text())) if path.is_file() else [])


def read_metrics(out_dir: Path) -> dict[int, dict]:
    """metrics.jsonl of a run as step -> values (lines of the same step merged, later values win)."""
    rows = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def losses(out_dir) -> list[float]:
    """The logged train/loss of every step of a run, in order."""
    rows = read_metrics(out_dir)
    return [rows[s]["train/loss"] for s in sorted(rows)]


def seed_checkpoint(cfg, source_dir: Path, step: int) -> None:
    """Give run `cfg` a copy of `source_dir`'s step-`step` checkpoint as its latest, so train(cfg) resumes there."""
    tag = tag_for(step)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    shutil.copytree(Path(source_dir) / "checkpoints" / tag, ckpts / tag)
    (ckpts / "latest").write_text(tag)


def resume_run(cfg, source_dir: Path, step: int):
    """The second half of a "straight run, checkpoint, resume, compare" test: run `cfg` from a copy of
    `source_dir`'s step-`step` checkpoint; returns (its metrics by step, the run result)."""
    seed_checkpoint(cfg, source_dir, step)
    result = train(cfg, build_method)
    return read_metrics(cfg.output_dir), result


def fully_partitioned_zero3(tmp_path) -> str:
    """ZeRO-3 without the small-parameter persistence, so even a tiny model is really partitioned."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_partitioned.json"
    path.write_text(json.dumps(ds))
    return str(path)


def plain_pytorch_losses(cfg, steps: int) -> list[float]:
    """The engine's step re-done with plain PyTorch: same init, batches, masking noise, lr schedule and hooks."""
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg)
    shards = resolve_shards(cfg.data.train)
    method.set_total_steps(steps, steps_per_epoch_for(cfg, cfg.data.num_samples or shards.num_samples))
    peak = cfg.optim.base_lr * cfg.data.batch_size / 256
    opt = torch.optim.AdamW(param_groups(method, cfg.optim.weight_decay), lr=peak, betas=cfg.optim.betas)
    torch.manual_seed(cfg.run.seed)
    loader = StreamLoader(shards.urls, SingleView(cfg.model.img_size, cfg.data.crop_scale,
                          cfg.data.hflip), cfg.data.batch_size, seed=cfg.run.seed,
                          shuffle_buffer=cfg.data.shuffle_buffer)
    out = []
    for step, batch in zip(range(steps), loader):
        set_lr(opt, lr_at(step, peak, steps, cfg.optim.warmup_steps))
        loss, _ = method(to_device(batch, torch.device("cpu"), cfg.data.mean, cfg.data.std), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.on_step_end(step + 1)
        out.append(loss.item())
    return out


def command(tmp_path, digits_dir, *overrides, launcher=(), module=("-m", "train.pretrain")):
    """A tiny `train.pretrain` command line writing into tmp_path/run (the tiny settings of the method named in
    `overrides`, `tiny_overrides`); `module`: what runs instead (a test script and its arguments)."""
    return [*launcher, *module, *tiny_overrides(overrides), f"run.output_dir={tmp_path / 'run'}",
            f"data.train={digits_dir / 'train.json'}", f"data.val={digits_dir / 'val.json'}", *overrides]


def torchrun(ranks: int) -> list[str]:
    """The command prefix that launches `ranks` local ranks under torchrun, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port())]


def poison(monkeypatch, bad_calls, how):
    """MAE's training forward with `how(loss)` on the calls (0-based) in `bad_calls`, as a bad data window would
    make it; returns the list of calls, each the step it was called for."""
    from train.methods.mae import MAE

    original, calls = MAE.forward, []

    def poisoned(self, batch, step=0):
        loss, report = original(self, batch, step)
        if loss.device.type == "meta":  # the planner's trace
            return loss, report
        calls.append(step)
        if len(calls) - 1 in bad_calls:
            loss = how(loss)
            report = {"loss": loss.detach()}
        return loss, report

    monkeypatch.setattr(MAE, "forward", poisoned)
    return calls


def run_env():
    """This process's environment without the rendezvous variables an in-process run may have set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


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


def tiny_resnet_clip(num_classes: int = 24):
    """A randomly initialised CLIP ResNet of RN50x64's structure (timm's `resnet50x64_clip` = OpenAI's
    ModifiedResNet: 3-conv stem + avg pool, bottleneck stages with avg-pool anti-aliasing, attention pool,
    output stride 32) at tiny widths (stem 8/8/16, stages 32/64/128/256) and depths (1/2/1/1), for 448 px
    inputs (a 14 x 14 last-stage map, as RN50x64's), with non-trivial BatchNorm statistics."""
    stages = [ByoBlockCfg(type="bottle", d=d, c=c, s=s, br=0.25) for d, c, s in
              ((1, 32, 1), (2, 64, 2), (1, 128, 2), (1, 256, 2))]
    cfg = replace(model_cfgs["resnet50x64_clip"], blocks=tuple(stages), stem_chs=(8, 8, 16), width_factor=1.0)
    model = ByobNet(cfg, num_classes=num_classes, img_size=448)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
    return model.eval()


def timm_to_openai_resnet(state: dict) -> dict:
    """A timm `resnet*_clip` state dict under OpenAI's ModifiedResNet names (`visual.*`), as CLIP's RN files hold it
    (the inverse of timm's byobnet `_convert_openai_clip`)."""
    names = {"conv1_1x1": "1", "conv2_kxk": "2", "conv3_1x1": "3"}
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.conv(\d)\.conv\.", r"conv\1.", key)
        key = re.sub(r"^stem\.conv(\d)\.bn\.", r"bn\1.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.(conv\d_\w+?)\.(conv|bn)\.",
                     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{names[m[3]]}.", key)
        key = re.sub(r"^stages\.(\d+)\.(\d+)\.shortcut\.conv\.(conv|bn)\.",
                     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'conv' else 1}.", key)
        if key.startswith("head."):
            key = "attnpool." + key[5:].replace("pos_embed", "positional_embedding")
            key = re.sub(r"^attnpool\.(q|k|v)\.", r"attnpool.\1_proj.", key).replace("attnpool.proj.",
                                                                                     "attnpool.c_proj.")
        out["visual." + key] = value.clone()
    return out
