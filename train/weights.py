"""Weights of a trained model from whatever the user points at.

A *source* is a run directory (`<run>/checkpoints/latest`), a checkpoints directory, one
`step_N` checkpoint (any method, any ZeRO stage 0-3), or an export written by
`python -m train.eval.export` (a timm `local-dir` folder: `model.safetensors` + `config.json`; the
`.safetensors` file itself works too). DeepSpeed checkpoints are read by `checkpoint.read_fp32_state`;
which of their tensors make the timm model is the writing method's export hook
(`Method.export_prefixes` / `Method.timm_state`), looked up in the `methods` registry the caller passes.
"""

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
from train.models.vit import ViTEncoder

ENCODER_PREFIX = "encoder.vit."  # a method's encoder (ViTEncoder.vit) in its state dict
HEAD_PREFIXES = ("fc_norm.", "head.")  # timm's classifier: the norm after pooling and the linear head
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


@dataclass
class Source:
    path: Path  # the checkpoint tag directory or the export directory
    kind: str  # "checkpoint" or "export"
    meta: dict  # model (architecture), method, step, config (the run's full config, when known)

    @property
    def tag(self) -> str:
        return self.path.name if self.kind == "checkpoint" else "export"

    @property
    def run_dir(self) -> Path:
        """Where evaluation results go by default: the run directory, or the export directory."""
        return self.path.parent.parent if self.kind == "checkpoint" else self.path

    def model_config(self) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.meta["model"].items() if k in names})

    def data_value(self, key: str, default=None):
        """`data.<key>` of the run that wrote the source (mean, std, train, val), if recorded."""
        return (self.meta.get("config") or {}).get("data", {}).get(key, default)


def resolve_source(path: str | Path, key: str = "checkpoint") -> Source:
    """The checkpoint or export `path` names; a clear error naming `key` when there is none."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{key}: not found: {p}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ConfigError(f"{key}: {p} is neither a checkpoint directory nor an exported .safetensors file")
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
