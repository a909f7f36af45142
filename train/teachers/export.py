"""Export a pretrained run's encoder as a teacher file: a timm ViT state dict in fp32.

    python -m train.teachers.export runs/mae_demo runs/mae_demo/teacher.pth [--tag step_00000400]

Works for every ZeRO stage (DeepSpeed's zero_to_fp32 gathers the partitioned weights). The file
loads with `method.teacher.path=<file> method.teacher.model=vit_base_patch16_224
method.teacher.num_heads=<heads>` (printed at the end), e.g. as the demo's local CLIP stand-in.
"""

import argparse
import sys
from pathlib import Path

import torch

from train import checkpoint


def export_encoder(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict:
    """Write the encoder weights of `run_dir`'s checkpoint `tag` (default: the newest complete one) to `out`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or checkpoint.find_resume_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}")
    meta = checkpoint.read_meta(ckpt_dir, tag)
    # zero_to_fp32 gives the fp32 master weights, and the frozen ones (sin-cos positions) only for stages >= 2;
    # below ZeRO-3 the saved module state holds every weight in full
    module_file = ckpt_dir / tag / "mp_rank_00_model_states.pt"
    state = torch.load(module_file, map_location="cpu", weights_only=False)["module"] if module_file.is_file() else {}
    state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag))
    encoder = {k.removeprefix("encoder.vit."): v.float() for k, v in state.items() if k.startswith("encoder.vit.")}
    if not encoder:
        raise ValueError(f"{ckpt_dir / tag} has no encoder.vit.* weights (method {meta.get('method')})")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.teachers.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's output_dir (its checkpoints/ is read)")
    parser.add_argument("out", help="the teacher file to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    args = parser.parse_args(argv)
    meta = export_encoder(args.run_dir, args.out, args.tag)
    data = meta["config"]["data"]
    settings = {"path": args.out, "model": "vit_base_patch16_224", "num_heads": meta["model"]["num_heads"],
                "mean": list(data["mean"]), "std": list(data["std"])}
    print(f"wrote {args.out}; as a teacher: " + " ".join(f"method.teacher.{k}={v}".replace(" ", "")
                                                           for k, v in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
