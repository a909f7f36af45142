"""Export a checkpoint (any method, ZeRO stage 0-3) to timm: safetensors weights + timm's config.json.

    python -m train.eval.export SOURCE OUT_DIR [--encoder-only] [--student]

OUT_DIR is a timm `local-dir` model folder, loadable without network:

    timm.create_model("local-dir:OUT_DIR", pretrained=True)

`model.safetensors` holds the timm VisionTransformer state the writing method exports
(`Method.timm_state`): its evaluation encoder (DINO: the teacher's; `--student`: the trained one),
plus fc_norm/head for a finetune or linear_probe run (the probe's BatchNorm folded into the head); `config.json` is
timm's own format (architecture = the exact timm model name, model_args, pretrained_cfg with the
run's mean/std) plus a `vitssl` section (method, step, architecture, the run's config).
"""

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf

from train.cli import USER_ERRORS, run_command
from train.config import ConfigError
from train.methods import METHODS
from train.models.vit import ViTEncoder
from train.weights import EXPORT_WEIGHTS, HEAD_PREFIXES, Source, resolve_source, timm_state

log = logging.getLogger("train")


def timm_spec_for(source: Source, state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """timm model name and keyword arguments for the source's architecture and the parts `state` holds."""
    with torch.device("meta"):
        name, kwargs = ViTEncoder(source.model_config()).timm_spec()
    kwargs["num_classes"] = state["head.weight"].shape[0] if "head.weight" in state else 0
    if "fc_norm.weight" in state:
        kwargs["global_pool"] = "avg"  # MAE/BEiT fine-tuning: mean of patch tokens, then fc_norm
    return name, kwargs


def build_timm_model(name: str, kwargs: dict, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """The timm model holding `state` (built on the meta device and assigned: no second copy in memory).

    Any missing, unexpected or mis-shaped key is an error: the export is exactly what timm loads.
    """
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"{what}: does not fit timm {name} {kwargs}: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}, shape mismatch {sorted(shapes)[:4]}")
    model.load_state_dict(state, assign=True)
    return model.eval()


def plain_file_modes(folder: Path) -> None:
    """Give the written files the mode a plain `open` gives (0644 under the usual umask): safetensors writes
    its file 0600, so a group sharing the export could not read it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export(source_path: str | Path, out_dir: str | Path, encoder_only: bool = False, student: bool = False) -> Path:
    """Write the timm folder for `source_path` into `out_dir` (atomically: a crash leaves no half export)."""
    source = resolve_source(source_path, "source")
    state = timm_state(source, METHODS, student)
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    name, kwargs = timm_spec_for(source, state)
    model = build_timm_model(name, kwargs, state, str(source.path))
    meta = {**source.meta, "source": str(source.path)}
    norm = state.get("norm.weight"), state.get("norm.bias")
    if norm[0] is not None and bool((norm[0] == 1).all() and (norm[1] == 0).all()):
        # D-iGPT's decoders read blocks before the final norm: timm's norm is there, at its unit init
        meta["final_norm"] = "untrained (unit scale, zero shift): pretraining did not use it"
        log.info("%s: the encoder's final norm was not trained (unit scale, zero shift); timm loads it as is",
                 source.path)
    mean = source.data_value("mean", (0.485, 0.456, 0.406))
    std = source.data_value("std", (0.229, 0.224, 0.225))
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(model, str(tmp), safe_serialization=True, model_args=kwargs,
                data_config={"mean": tuple(mean), "std": tuple(std), "interpolation": "bicubic", "crop_pct": 0.875},
                model_config={"vitssl": meta,
                              "pretrained_cfg": {"tag": f"vitssl_{source.meta.get('method')}_{source.tag}"}})
    plain_file_modes(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    parts = "encoder" + (" + classifier head" if any(k.startswith(HEAD_PREFIXES) for k in state) else "")
    log.info("exported %s (%s, %d tensors) of %s to %s; load it with timm.create_model('local-dir:%s', "
             "pretrained=True) = %s %s", parts, source.meta.get("method"), len(state), source.path,
             out_dir / EXPORT_WEIGHTS, out_dir, name, kwargs)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.eval.export", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="run dir, checkpoint dir or step_N dir (any method, any ZeRO stage)")
    parser.add_argument("out_dir", help="timm model folder to write (model.safetensors + config.json)")
    parser.add_argument("--encoder-only", action="store_true", help="leave out a classifier head")
    parser.add_argument("--student", action="store_true", help="the trained encoder of a method that exports "
                        "another one (DINO: the student instead of the teacher)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: export(args.source, args.out_dir, args.encoder_only, args.student), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
