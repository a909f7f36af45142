"""Export a pretrained run's encoder as a teacher file: a timm ViT state dict in fp32.

    python -m train.teachers.export runs/mae_demo runs/mae_demo/teacher.pth [--tag step_00000400]

Works for every ZeRO stage (`checkpoint.read_fp32_state`) and takes the encoder the method exports
(DINO: its teacher's; `--student`: the trained one). The file
loads with `method.teacher.path=<file> method.teacher.model=vit_base_patch16_224
method.teacher.num_heads=<heads>` (printed at the end), e.g. as the demo's local CLIP stand-in.
"""

import argparse
import sys
from pathlib import Path

import torch

from train import checkpoint
from train.methods import METHODS
from train.weights import HEAD_PREFIXES, resolve_source, timm_state


def export_encoder(run_dir: str | Path, out: str | Path, tag: str | None = None, student: bool = False) -> dict:
    """Write the encoder weights of `run_dir`'s checkpoint `tag` (default: the newest complete one) to `out`."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or checkpoint.find_resume_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    source = resolve_source(ckpt_dir / tag)
    meta = source.meta
    encoder = {k: v for k, v in timm_state(source, METHODS, student).items() if not k.startswith(HEAD_PREFIXES)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.teachers.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's output_dir (its checkpoints/ is read)")
    parser.add_argument("out", help="the teacher file to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--student", action="store_true", help="DINO: the student's encoder, not the teacher's")
    args = parser.parse_args(argv)
    meta = export_encoder(args.run_dir, args.out, args.tag, args.student)
    data = meta["config"]["data"]
    settings = {"path": args.out, "model": "vit_base_patch16_224", "num_heads": meta["model"]["num_heads"],
                "mean": list(data["mean"]), "std": list(data["std"])}
    print(f"wrote {args.out}; as a teacher: " + " ".join(f"method.teacher.{k}={v}".replace(" ", "")
                                                           for k, v in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
