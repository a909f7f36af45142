"""Frozen CLIP-like teachers loaded from local weights, giving features on the student's patch grid.

Two kinds of image tower, both timm models whose weights come from a local file (nothing is ever
downloaded), each an OpenAI / open_clip CLIP checkpoint (`visual.*` keys, a plain state dict or
OpenAI's TorchScript archive) or a timm state dict (`.pt`, `.pth`, `.bin` or `.safetensors`):

- a ViT (timm `VisionTransformer`, the `vit_*_clip_*` architectures): width, depth, patch size,
  resolution, MLP ratio and projection size are read from the file; the architecture name gives
  the rest (block style, norms, activation) and `num_heads` overrides its head count. Features:
  every token after the final norm, projected by CLIP's `proj` when `project`.
- a CLIP ResNet (OpenAI's ModifiedResNet = timm's `ByobNet` `resnet*_clip`, e.g. `resnet50x64_clip`):
  stem and stage widths and depths are read from the file, the architecture name gives the rest
  (3-conv stem + avg pool, bottlenecks with avg-pool anti-aliasing, output stride 32). Features:
  the last stage's map before the attention pool (MaPeT's k-CLIP: RN50x64 layer 4, 4096 channels
  on a 14 x 14 grid at 448 px), one per cell; its mean stands in for a class token.

The teacher lives outside the method's module tree (a plain attribute), so DeepSpeed never casts,
partitions, optimizes or checkpoints it. It runs without gradients, in bf16 on GPUs (fp32 on CPU).
"""

import logging
import math
import types
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models import byobnet
from timm.models.vision_transformer import checkpoint_filter_fn
from torch.utils.flop_counter import FlopCounterMode

from train.config import ConfigError
from train.models.vit import vit_forward_flops

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# where each checkpoint format keeps what the architecture's shape is read from
_OPENAI = dict(patch="visual.conv1.weight", pos="visual.positional_embedding", blocks="visual.transformer.resblocks.",
               fc1="visual.transformer.resblocks.0.mlp.c_fc.weight", proj="visual.proj")
_TIMM = dict(patch="patch_embed.proj.weight", pos="pos_embed", blocks="blocks.", fc1="blocks.0.mlp.fc1.weight",
             proj="head.weight")


@dataclass
class TeacherConfig:
    path: str = ""  # local weights of the image tower (OpenAI / open_clip CLIP checkpoint or timm ViT state dict)
    model: str = "vit_base_patch16_clip_224"  # timm architecture (vit_huge_patch14_clip_224: open_clip ViT-H/14;
    #                                           resnet50x64_clip: OpenAI's RN50x64, MaPeT's k-CLIP)
    num_heads: int = 0  # attention heads; 0: the architecture's (set it for a tower of another width)
    img_size: int = 0  # the teacher's input side; 0: the resolution its weights were trained at
    project: bool = True  # ViT: apply the tower's output projection (CLIP's `proj`) to every token, as D-iGPT
    #                       (a ResNet's features are always the last stage's map, before the attention pool)
    mean: tuple[float, float, float] = CLIP_MEAN  # the input normalisation the teacher was trained with
    std: tuple[float, float, float] = CLIP_STD

    def validate(self, key: str = "method.teacher") -> None:
        if not self.path:
            raise ConfigError(f"{key}.path is empty: point it at a local CLIP image-tower checkpoint "
                              "(weights are never downloaded)")
        if not Path(self.path).is_file():
            raise ConfigError(f"{key}.path: teacher weights not found: {self.path}")
        if not timm.is_model(self.model):
            raise ConfigError(f"{key}.model: unknown timm architecture {self.model!r} (e.g. vit_base_patch16_clip_224)")
        if self.num_heads < 0 or self.img_size < 0:
            raise ConfigError(f"{key}.num_heads={self.num_heads} and {key}.img_size={self.img_size} must be >= 0")


def read_state_dict(path: str, key: str = "method.teacher.path") -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, a torch state dict (optionally under 'state_dict' or
    'model', DDP 'module.' prefixes removed) or a TorchScript archive (OpenAI's CLIP releases)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: teacher weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # optional: only for .safetensors teachers

        state = load_file(path)
    elif zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        state = torch.jit.load(path, map_location="cpu").state_dict()  # OpenAI's CLIP releases: TorchScript
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not a torch file: one line says so
            raise ValueError(f"{key}: cannot read {path} ({str(err).splitlines()[0]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items()}


def tower_shape(state: dict[str, torch.Tensor], path: str) -> dict:
    """timm VisionTransformer keyword arguments for the tower whose weights are `state`."""
    keys = _OPENAI if _OPENAI["patch"] in state else _TIMM if _TIMM["patch"] in state else None
    if keys is None:
        raise ValueError(f"method.teacher.path: {path} holds neither an OpenAI/open_clip CLIP checkpoint "
                         "(visual.* keys) nor a timm ViT state dict (patch_embed.*, blocks.*)")
    patch = state[keys["patch"]]
    positions = state[keys["pos"]].reshape(-1, patch.shape[0]).shape[0]
    grid = math.isqrt(positions - 1)
    depth = len({k[len(keys["blocks"]):].split(".")[0] for k in state if k.startswith(keys["blocks"])})
    proj = state.get(keys["proj"])
    out_dim = 0 if proj is None else proj.shape[1] if keys is _OPENAI else proj.shape[0]
    shape = dict(embed_dim=patch.shape[0], depth=depth, patch_size=patch.shape[-1], img_size=grid * patch.shape[-1],
                 mlp_ratio=state[keys["fc1"]].shape[0] / patch.shape[0], num_classes=out_dim)
    if "blocks.0.ls1.gamma" in state:  # LayerScale blocks (e.g. an exported MaPeT encoder): the file sets the gammas
        shape["init_values"] = 1.0
    return shape


_RESNET_OPENAI, _RESNET_TIMM = "visual.layer1.0.conv1.weight", "stages.0.0.conv1_1x1.conv.weight"


def is_resnet(state: dict[str, torch.Tensor]) -> bool:
    return _RESNET_OPENAI in state or _RESNET_TIMM in state


def resnet_config(arch: str, state: dict[str, torch.Tensor]) -> "byobnet.ByoModelCfg":
    """timm's ByobNet config of `arch` (e.g. resnet50x64_clip) with the stem and stage widths and depths of
    the trunk whose timm-named weights are `state`; no head (the features are the last stage's map)."""
    stem = tuple(state[f"stem.conv{i}.conv.weight"].shape[0] for i in (1, 2, 3))
    stages = []
    for i in range(4):
        depth = len({k.split(".")[2] for k in state if k.startswith(f"stages.{i}.")})
        out = state[f"stages.{i}.0.conv3_1x1.conv.weight"].shape[0]
        mid = state[f"stages.{i}.0.conv1_1x1.conv.weight"].shape[0]
        stages.append(byobnet.ByoBlockCfg(type="bottle", d=depth, c=out, s=1 if i == 0 else 2, br=mid / out))
    return replace(byobnet.model_cfgs[arch], blocks=tuple(stages), stem_chs=stem, width_factor=1.0,
                   head_type="classifier")


def load_resnet(cfg: TeacherConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The frozen CLIP ResNet trunk of `cfg.model` (timm ByobNet) with the weights in `state` (OpenAI or timm
    names); `input_size` (the side it was trained at, or cfg.img_size) and `flops` (per image) set on it."""
    if cfg.model not in byobnet.model_cfgs or not cfg.model.startswith("resnet"):
        raise ConfigError(f"method.teacher: {cfg.path} holds a CLIP ResNet; set method.teacher.model to its timm "
                          f"architecture (e.g. resnet50x64_clip), not {cfg.model!r}")
    # the attention pool's positions ((input side / 32)^2 + 1) give the input size; the pool itself is not used
    pool_pos = state.get("visual.attnpool.positional_embedding", state.get("head.pos_embed"))
    if _RESNET_OPENAI in state:  # timm's own OpenAI -> ByobNet renaming (no attention pool kept)
        state = byobnet.checkpoint_filter_fn(state, types.SimpleNamespace(head=None))
    side = cfg.img_size or (32 * math.isqrt(pool_pos.shape[0] - 1) if pool_pos is not None else 0)
    if not side:
        raise ConfigError(f"method.teacher.img_size: {cfg.path} has no attention pool to read the input size from; "
                          "set it (448 for RN50x64)")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        with torch.device("meta"):
            model = byobnet.ByobNet(resnet_config(cfg.model, state), num_classes=0)
            with FlopCounterMode(display=False) as counter:
                model.forward_features(torch.empty(1, 3, side, side))
        for key in model.state_dict():  # BatchNorm step counters are not in every release
            if key.endswith("num_batches_tracked"):
                state.setdefault(key, torch.zeros((), dtype=torch.long))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except (KeyError, RuntimeError, ValueError) as err:
        raise ConfigError(f"method.teacher: {cfg.path} does not fit architecture {cfg.model} "
                          f"({str(err).splitlines()[0]})") from None
    if missing or unexpected:
        raise ConfigError(f"method.teacher: {cfg.path} does not fit architecture {cfg.model}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    model.input_size, model.flops = side, counter.get_total_flops()
    return model.float().eval().requires_grad_(False)


def load_tower(cfg: TeacherConfig) -> torch.nn.Module:
    """The frozen (eval, fp32, no grad) timm tower of `cfg.model` with the weights of `cfg.path`: a
    VisionTransformer, or a CLIP ResNet trunk (`load_resnet`) when the file holds one."""
    state = read_state_dict(cfg.path)
    if is_resnet(state):
        return load_resnet(cfg, state)
    shape = tower_shape(state, cfg.path)
    if cfg.num_heads:
        shape["num_heads"] = cfg.num_heads
    try:
        with torch.device("meta"):  # no random init of a large tower: the weights are assigned below
            model = timm.create_model(cfg.model, pretrained=False, **shape)
        missing, unexpected = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False, assign=True)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"method.teacher: {cfg.path} does not fit architecture {cfg.model} with {shape} "
                          f"({str(err).splitlines()[0]}); check method.teacher.model / num_heads") from None
    if missing or unexpected:
        raise ConfigError(f"method.teacher: {cfg.path} does not fit architecture {cfg.model}: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}; check method.teacher.model")
    if cfg.img_size and cfg.img_size != shape["img_size"]:
        model.set_input_size(img_size=(cfg.img_size, cfg.img_size))  # resamples the position embeddings once
    return model.float().eval().requires_grad_(False)


def align_to_grid(tokens: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch features (B, gh*gw, C) on `grid` resampled bilinearly to `out_grid` (B, oh*ow, C)."""
    if tuple(grid) == tuple(out_grid):
        return tokens
    b, _, c = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, c, *grid)
    maps = F.interpolate(maps, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


class FrozenTeacher:
    """A frozen image tower held outside the module tree; `teacher(images)` -> (cls (B, C), patches (B, N, C)).

    `images` are normalised with the data's mean/std (as the batch contract delivers them); they are
    re-normalised to the teacher's, resized to its input size, and the patch features are resampled
    to the student's `grid` (e.g. a 16x16 ViT-H/14 grid onto a 14x14 ViT-B/16 grid). float32 out.
    """

    def __init__(self, cfg: TeacherConfig, grid: tuple[int, int], data_mean, data_std):
        self.model = load_tower(cfg)
        self.convnet = isinstance(self.model, byobnet.ByobNet)
        self.project = cfg.project and not self.convnet
        self.grid = tuple(grid)
        if self.convnet:
            side = self.model.input_size
            self.img_size, self.native_grid = (side, side), (side // 32, side // 32)
        else:
            self.img_size = tuple(self.model.patch_embed.img_size)
            self.native_grid = tuple(self.model.patch_embed.grid_size)
        # (x * std_d + mean_d - mean_t) / std_t = x * scale + shift
        data_mean, data_std = torch.tensor(data_mean), torch.tensor(data_std)
        self.scale = (data_std / torch.tensor(cfg.std)).view(1, 3, 1, 1)
        self.shift = ((data_mean - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)).view(1, 3, 1, 1)
        log.info("teacher %s from %s: %d-d features on a %s grid at %d px, resampled to %s", cfg.model, cfg.path,
                 self.out_dim, self.native_grid, self.img_size[0], self.grid)

    @property
    def out_dim(self) -> int:
        if self.convnet:
            return self.model.num_features
        head = self.model.head
        return head.out_features if self.project and isinstance(head, torch.nn.Linear) else self.model.embed_dim

    def on(self, device: torch.device) -> "FrozenTeacher":
        """Move the tower to `device` (bf16 weights on GPUs) the first time it is needed there."""
        if self.scale.device != device:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.model.to(device, dtype)
            self.scale, self.shift = self.scale.to(device), self.shift.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.on(images.device)
        x = images.float() * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x, size=self.img_size, mode="bicubic", align_corners=False, antialias=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.device.type == "cuda"):
            tokens = self.model.forward_features(x)
            if self.convnet:  # (B, C, h, w) map of the last stage -> one feature per cell
                grid = tuple(tokens.shape[-2:])
                patches = tokens.flatten(2).transpose(1, 2).float()
                return patches.mean(1), align_to_grid(patches, grid, self.grid)
            if self.project:
                tokens = self.model.head(tokens)
        tokens = tokens.float()
        patches = tokens[:, self.model.num_prefix_tokens:]
        return tokens[:, 0], align_to_grid(patches, self.native_grid, self.grid)

    def forward_flops(self) -> float:
        """Forward FLOPs per image (2 per multiply-add): patch embedding and blocks, or the ResNet trunk."""
        m = self.model
        if self.convnet:
            return float(m.flops)
        tokens = m.patch_embed.num_patches + m.num_prefix_tokens
        width = m.embed_dim
        embed = 2 * m.patch_embed.num_patches * 3 * math.prod(m.patch_embed.patch_size) * width
        mlp_ratio = m.blocks[0].mlp.fc1.out_features / width
        return embed + vit_forward_flops(tokens, width, len(m.blocks), mlp_ratio)
