"""Train a small ViT classifier on a labelled shard set and save its encoder as a teacher file.

    python -m train.teachers.supervised --config train/configs/mae_demo.yaml runs/demo_teacher/teacher.pth

A local stand-in for CLIP where no pretrained weights can be had (the demo): class labels play the
part of CLIP's text supervision, so the teacher's features are semantic, which a short MAE run's
are not. Model, data and optimiser settings come from the config (the digits demo when data.train
is empty); the file is a timm ViT state dict (`method.teacher.model=vit_base_patch16_224`).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.augment import build_views
from data_pipeline.stream import StreamLoader, resolve_shards, to_device
from train.config import ConfigError, load_config
from train.eval.features import extract_features
from train.models.vit import ViTEncoder
from train.optim import lr_at, param_groups, set_lr

log = logging.getLogger("train")


def train_teacher(cfg, out: str, steps: int, lr: float = 1e-3) -> float:
    """Supervised training of `cfg.model` on data.train's labels; saves the encoder, returns data.val top-1 (%)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    shards = resolve_shards(cfg.data.train)
    num_classes = len(shards.classes)
    torch.manual_seed(cfg.run.seed)
    model = nn.ModuleDict({"encoder": ViTEncoder(cfg.model), "head": nn.Linear(cfg.model.embed_dim, num_classes)})
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr)
    loader = StreamLoader(shards.urls, build_views(cfg.data, cfg.model.img_size), cfg.data.batch_size,
                          seed=cfg.run.seed, shuffle_buffer=cfg.data.shuffle_buffer, workers=cfg.data.workers)
    for step, batch in zip(range(steps), loader):
        set_lr(optimizer, lr_at(step, lr, steps, max(1, steps // 10)))
        batch = to_device(batch, device, cfg.data.mean, cfg.data.std)
        loss = F.cross_entropy(model["head"](model["encoder"](batch["images"], pool="token")), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % cfg.run.log_every == 0:
            log.info("teacher step %d/%d: loss %.4f", step + 1, steps, loss.item())
    feats, labels = extract_features(model["encoder"], cfg.data.val, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                                     device)
    with torch.no_grad():
        accuracy = 100.0 * (model["head"](feats.to(device)).argmax(-1).cpu() == labels).float().mean().item()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model["encoder"].vit.state_dict().items()}, out)
    log.info("teacher: %.1f%% top-1 on %s; written to %s", accuracy, cfg.data.val, out)
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.teachers.supervised", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="model, data and run settings (e.g. train/configs/mae_demo.yaml)")
    parser.add_argument("out", help="the teacher file to write")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from train.distributed import WorldInfo
    from train.engine import prepare_data

    cfg = prepare_data(cfg, WorldInfo(rank=0, local_rank=0, world_size=1))
    train_teacher(cfg, args.out, args.steps, args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
