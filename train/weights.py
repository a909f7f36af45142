"""Weights of a trained model from whatever the user points at.

A *source* is a run directory (`<run>/checkpoints/latest`), a checkpoints directory, one
`step_N` checkpoint (any method, any ZeRO stage 0-3), or an export written by
`python -m train.eval.export` (a timm `local-dir` folder: `model.safetensors` + `config.json`; the
`.safetensors` file itself works too), or an official release's file (`.pth`, see `official_state`):
facebookresearch/mae `mae_pretrain_vit_*.pth`, DINO (full checkpoints: the teacher, or `FILE.pth:student`;
or the backbone-only releases) and MoCo v3 (the momentum encoder, or `FILE.pth:base_encoder`). DeepSpeed
checkpoints are read by `checkpoint.read_fp32_state`; which of their tensors make the timm model is the
writing method's export hook (`Method.export_prefixes` / `Method.timm_state`), looked up in the `methods`
registry the caller passes.
"""

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from train import checkpoint
from train.config import ConfigError, ModelConfig
from train.models.decoder import MAEDecoder
from train.models.vit import TIMM_SIZES, ViTEncoder

ENCODER_PREFIX = "encoder.vit."  # a method's encoder (ViTEncoder.vit) in its state dict
HEAD_PREFIXES = ("fc_norm.", "head.")  # timm's classifier: the norm after pooling and the linear head
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


@dataclass
class Source:
    path: Path  # the checkpoint tag directory, the export directory or the official file
    kind: str  # "checkpoint", "export" or "official"
    meta: dict  # model (architecture), method, step, config (the run's full config, when known)

    part: str = ""  # official files: the part chosen by a `:part` suffix ("" = the layout's default)

    @property
    def tag(self) -> str:
        return {"checkpoint": self.path.name, "export": "export"}.get(self.kind, self.path.stem)

    @property
    def run_dir(self) -> Path:
        """Where evaluation results go by default: the run directory, the export directory, or beside the file."""
        return {"checkpoint": self.path.parent.parent, "export": self.path}.get(self.kind, self.path.parent)

    def model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.meta["model"].items() if k in names})

    def data_value(self, key: str, default=None):
        """`data.<key>` of the run that wrote the source (mean, std, train, val), if recorded."""
        return (self.meta.get("config") or {}).get("data", {}).get(key, default)


def resolve_source(path: str | Path, key: str = "checkpoint") -> Source:
    """The checkpoint or export `path` names; a clear error naming `key` when there is none."""
    p, part = Path(path), ""
    if not p.exists() and ":" in p.name and p.with_name(p.name.rsplit(":", 1)[0]).is_file():
        p, part = p.with_name(p.name.rsplit(":", 1)[0]), p.name.rsplit(":", 1)[1]  # FILE.pth:student
    if not p.exists():
        raise FileNotFoundError(f"{key}: not found: {p}")
    if p.is_file() and p.suffix in OFFICIAL_SUFFIXES:
        layout, encoder, _ = official_state(p, part)
        return Source(p, "official", {"model": dataclasses.asdict(architecture_of(encoder, layout)),
                                      "method": f"{layout} (official)", "step": None}, part)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"{key}: {p} is neither a checkpoint directory, an exported .safetensors file nor an "
                              f"official checkpoint ({', '.join(OFFICIAL_SUFFIXES)})")
        p = p.parent
    if (p / EXPORT_WEIGHTS).is_file():
        config = p / EXPORT_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"{key}: {config} (written by train.eval.export beside the weights) is missing")
        meta = json.loads(config.read_text()).get("vitssl")
        if not meta:
            raise ConfigError(f"{key}: {config} has no 'vitssl' section; export the checkpoint with train.eval.export")
        return Source(p, "export", meta)
    if checkpoint.TAG_RE.match(p.name):
        if not (p / checkpoint.MARKER).exists():
            raise ConfigError(f"{key}: {p} is not a complete checkpoint (no {checkpoint.MARKER} marker)")
        ckpt_dir, tag = p.parent, p.name
    else:
        ckpt_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        tag = checkpoint.find_resume_tag(ckpt_dir)
        if tag is None:
            raise ConfigError(f"{key}: no complete checkpoint under {ckpt_dir} and no {EXPORT_WEIGHTS} in {p}")
    return Source(ckpt_dir / tag, "checkpoint", checkpoint.read_meta(ckpt_dir, tag))


def timm_state(source: Source, methods: Mapping[str, type], student: bool = False) -> dict[str, torch.Tensor]:
    """The source's weights with timm VisionTransformer names, as the method that wrote it exports them
    (`methods`: the registry; `student`: a method's trained encoder where it would export another, e.g.
    DINO's student instead of its teacher)."""
    if source.kind == "export":
        return load_file(source.path / EXPORT_WEIGHTS)
    if source.kind == "official":
        return official_state(source.path, source.part)[1]
    name = source.meta.get("method")
    if name not in methods:
        raise ConfigError(f"{source.path}: written by method {name!r}, which is not registered")
    method = methods[name]
    out = method.timm_state(checkpoint.read_fp32_state(source.path, method.export_prefixes), student)
    if not out:
        raise ConfigError(f"{source.path}: no encoder weights (keys under '{ENCODER_PREFIX}'); the method "
                          f"{name} has no `encoder` to evaluate or export")
    return out


def load_encoder(source: Source, methods: Mapping[str, type], model_cfg: ModelConfig | None = None,
                 student: bool = False) -> ViTEncoder:
    """A `ViTEncoder` holding the source's encoder weights (architecture from the source unless given;
    position embeddings are resampled to `model_cfg.img_size`)."""
    state = timm_state(source, methods, student)
    if "fc_norm.weight" in state and "norm.weight" not in state:
        raise ConfigError(f"{source.path}: a classifier fine-tuned with average pooling (fc_norm) has no final "
                          "encoder norm; k-NN, linear probes and fine-tuning start from pretrained encoders")
    encoder = ViTEncoder(model_cfg or source.model_config())
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    pos, own = state.get("pos_embed"), encoder.vit.pos_embed
    if pos is not None and pos.shape[1:] != own.shape[1:] and pos.shape[-1] == own.shape[-1]:
        # another image size (e.g. fine-tuning at 384 after pretraining at 224): interpolate, as MAE does
        state["pos_embed"] = resample_abs_pos_embed(pos, list(encoder.grid_size), num_prefix_tokens=1)
    load_strict(encoder.vit, state, str(source.path))
    return encoder


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """load_state_dict that reports missing, unexpected or mis-shaped keys in one line naming `name`."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"{name}: weights do not fit the model (another architecture?): missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, shape mismatch {shapes[:3]}")
    module.load_state_dict(state)


def check_same_architecture(source: Source, model_cfg: ModelConfig, key: str,
                            fields=("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")) -> None:
    """Error naming the first model.<field> where `model_cfg` differs from the source's architecture."""
    theirs = source.model_config()
    for name in fields:
        if getattr(theirs, name) != getattr(model_cfg, name):
            raise ConfigError(f"{key}: {source.path} holds model.{name}={getattr(theirs, name)}, this run has "
                              f"model.{name}={getattr(model_cfg, name)} (another architecture)")


# -- official releases --------------------------------------------------------------------------------------

OFFICIAL_SUFFIXES = (".pth", ".pt", ".tar")
MAE_DECODER_NAMES = {"decoder_embed.": "embed.", "decoder_pos_embed": "pos_embed", "mask_token": "mask_token",
                     "decoder_blocks.": "blocks.", "decoder_norm.": "norm.", "decoder_pred.": "pred."}


def _split(state: dict, prefix: str) -> tuple[dict, dict]:
    """(the entries under `prefix` with it removed, the others)."""
    inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in state.items() if not k.startswith(prefix)}


def official_state(path: Path, part: str = "") -> tuple[str, dict, dict]:
    """(layout, encoder state with timm VisionTransformer names, MAE decoder state with MAEDecoder names or {})
    of an official release's checkpoint file.

    Layouts: facebookresearch/mae `{'model': ...}` (encoder keys are timm's; `decoder_*` and `mask_token`
    where present); DINO `{'teacher', 'student'}` (`[module.]backbone.*`; the projection `head.*` left out;
    default part: teacher, as DINO's evaluations); MoCo v3 `{'state_dict'}` (`module.base_encoder.*` /
    `module.momentum_encoder.*`; the projector `head.*` and `module.predictor.*` left out; default part:
    momentum_encoder); a bare backbone state dict (DINO's backbone-only releases). Anything else in the
    chosen part is an error naming the file and the keys; missing or mis-shaped encoder keys are reported
    by `load_strict`.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):  # DINO's checkpoints hold their args
        obj = torch.load(path, map_location="cpu", weights_only=True)
    parts = {"mae": ("model",), "dino": ("teacher", "student"), "moco_v3": ("momentum_encoder", "base_encoder")}
    if isinstance(obj, dict) and "model" in obj:
        layout, state = "mae", obj["model"]
    elif isinstance(obj, dict) and "teacher" in obj and "student" in obj:
        layout, state = "dino", obj[part or "teacher"] if part in ("", *parts["dino"]) else None
    elif isinstance(obj, dict) and "state_dict" in obj:
        layout, state = "moco_v3", obj["state_dict"]
    elif isinstance(obj, dict) and "patch_embed.proj.weight" in obj:
        layout, state = "backbone", obj
    else:
        keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{path}: not an official MAE ('model'), DINO ('teacher'/'student'), MoCo v3 "
                          f"('state_dict') or backbone checkpoint; it holds {keys}")
    if part and part not in parts.get(layout, ()):
        raise ConfigError(f"{path}:{part}: a {layout} checkpoint has the parts {list(parts.get(layout, ()))}")
    decoder, rest = {}, {}
    if layout == "mae":
        for theirs, ours in MAE_DECODER_NAMES.items():
            inside, state = _split(state, theirs)
            decoder.update({ours + k: v for k, v in inside.items()})
        encoder = state
    elif layout == "dino":
        state = {k.removeprefix("module."): v for k, v in state.items()}
        encoder, rest = _split(state, "backbone.")
        rest = {k: v for k, v in rest.items() if not k.startswith("head.")}  # DINOHead
    elif layout == "moco_v3":
        encoder, rest = _split(state, f"module.{part or 'momentum_encoder'}.")
        encoder = {k: v for k, v in encoder.items() if not k.startswith("head.")}  # the projector
        rest = {k: v for k, v in rest.items()
                if not k.startswith(("module.base_encoder.", "module.momentum_encoder.", "module.predictor."))}
    else:
        encoder = state
    if rest or not encoder:
        raise ConfigError(f"{path}: a {layout} checkpoint with unexpected keys {sorted(rest)[:4]}"
                          + ("" if encoder else " and no encoder weights"))
    return layout, {k: v.float() for k, v in encoder.items()}, {k: v.float() for k, v in decoder.items()}


def architecture_of(encoder: dict, layout: str) -> ModelConfig:
    """The ViT an encoder state dict (timm names, class token) holds; heads by timm's size names (standard
    ViTs; otherwise 64 channels per head, the usual width), which weights alone cannot tell."""
    try:
        dim, patch = encoder["cls_token"].shape[-1], encoder["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks."))
        grid = int(round((encoder["pos_embed"].shape[1] - 1) ** 0.5))
        mlp_ratio = encoder["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except (KeyError, ValueError) as err:
        raise ConfigError(f"a {layout} checkpoint without a ViT encoder's {err} (cls_token, pos_embed, "
                          "patch_embed.proj.weight, blocks.N.*)") from None
    heads = next((h for (d, n, h) in TIMM_SIZES if (d, n) == (dim, depth)), max(1, dim // 64))
    return ModelConfig(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                       mlp_ratio=mlp_ratio, pos_embed="learned" if layout == "dino" else "sincos")


def load_mae_decoder(path: Path, num_heads: int = 16):
    """The `MAEDecoder` of an official MAE checkpoint that has one (`mae_visualize_vit_*.pth`); MAE's
    decoders all have 16 heads (the weights cannot tell)."""
    layout, encoder, decoder = official_state(path)
    if not decoder:
        raise ConfigError(f"{path}: a {layout} checkpoint without an MAE decoder (decoder_* keys)")
    arch = architecture_of(encoder, layout)
    grid = (arch.img_size // arch.patch_size,) * 2
    dim, out_dim = decoder["embed.weight"].shape[0], decoder["pred.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in decoder if k.startswith("blocks."))
    module = MAEDecoder(grid, arch.embed_dim, dim, depth, num_heads, out_dim=out_dim,
                        mlp_ratio=decoder["blocks.0.mlp.fc1.weight"].shape[0] / dim)
    load_strict(module, decoder, str(path))
    return module
