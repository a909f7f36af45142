"""The shared ViT encoder: timm's VisionTransformer, run on any subset of patch tokens and any patch size.

`ViTEncoder.vit` is a plain `timm.models.vision_transformer.VisionTransformer` (no head), so its
state dict is exactly what `timm.create_model(timm_name, num_classes=0)` loads. Other patch sizes
(patch scaling, FlexiViT-style) resample the base weights on the fly and never change them.
"""

from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbedInterpolator, build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models import checkpoint, checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from train.config import ModelConfig
from train.models.masking import gather_tokens

# (embed_dim, depth, num_heads) -> timm size name
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge", (1664, 48, 16): "giant"}


def sincos_pos_embed(grid: tuple[int, int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings (1, [1 +] H*W, dim) in MAE's layout (util/pos_embed.py,
    `get_2d_sincos_pos_embed`): channels [sin w, cos w, sin h, cos h] of the column (w) and row (h)
    index, frequencies 1 / 10000^(k / (dim / 4)), computed in float64; the class-token slot all zeros."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64),
                                indexing="ij")
    out_w, out_h = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega
    pos = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1).float()
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)


def timm_sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """The table in timm's layout (`build_sincos2d_pos_embed`: [sin h, sin w, cos h, cos w]), a channel
    permutation of MAE's: what this project's decoders used before they saved their table."""
    return torch.cat([torch.zeros(1, dim), build_sincos2d_pos_embed(list(grid), dim)], dim=0).unsqueeze(0)


def patch_grid(image_size, patch_size: int) -> tuple[int, int]:
    """Patches per side when an image of `image_size` (h, w) is cut into `patch_size` patches (rounded, >= 1)."""
    return tuple(max(1, int(side / patch_size + 0.5)) for side in image_size)


def init_mae_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears (and patch projection, seen as a linear), unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def vit_forward_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (2 per multiply-add) of `depth` transformer blocks over `tokens` tokens."""
    per_block = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
    return depth * per_block


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, in_chans: int = 3):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=cfg.drop_path, init_values=cfg.init_values or None, weight_init="skip",
        )
        init_mae_weights(self.vit)
        w = self.vit.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.vit.cls_token, std=0.02)
        if cfg.pos_embed == "sincos":
            self.vit.pos_embed.data.copy_(sincos_pos_embed(self.grid_size, cfg.embed_dim))
            self.vit.pos_embed.requires_grad_(False)
        else:
            nn.init.trunc_normal_(self.vit.pos_embed, std=0.02)
        if cfg.grad_checkpointing:
            self.vit.set_grad_checkpointing(True)
        # PI-resampling of the patch projection to other patch sizes (caches one matrix per size; no weights)
        self.patch_interpolator = PatchEmbedInterpolator((cfg.patch_size, cfg.patch_size), in_chans, cfg.embed_dim)
        # forward() reads these outside vit.forward(): tell ZeRO-3 to gather them for this module
        import deepspeed  # heavy: DeepSpeed, loaded when a model is built

        for param in (self.vit.cls_token, self.vit.pos_embed, *self.vit.patch_embed.proj.parameters()):
            deepspeed.zero.register_external_parameter(self, param)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def embed(self, images: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """Patch tokens with their position embeddings, no class token: (B, N, D), raster order.

        Any image size and patch size (default: the model's) work: the image is cut into
        `patch_grid(image size, patch size)` patches (resized to fit if needed), the patch
        projection is PI-resampled to the patch size (FlexiViT; timm's PatchEmbedInterpolator) and
        the position embeddings to the grid (timm's resample_abs_pos_embed). At the model's own
        size both are the stored weights unchanged.
        """
        p = patch_size or self.patch_size
        grid = patch_grid(images.shape[-2:], p)
        if (grid[0] * p, grid[1] * p) != tuple(images.shape[-2:]):
            images = F.interpolate(images, size=(grid[0] * p, grid[1] * p), mode="bilinear", antialias=True)
        proj = self.vit.patch_embed.proj
        x = self.patch_interpolator(images.to(proj.weight.dtype), proj.weight, proj.bias, (p, p), is_linear=False)
        x = self.vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        return x + self.patch_positions(grid)

    def patch_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings of the patch tokens on a `grid` (1, N, D): the stored ones resampled."""
        if tuple(grid) == self.grid_size:
            return self.vit.pos_embed[:, 1:]
        pos = resample_abs_pos_embed(self.vit.pos_embed, list(grid), list(self.grid_size), num_prefix_tokens=1)
        return pos[:, 1:]

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | Callable | None = None, pool: str | None = None,
                attn_mask: torch.Tensor | None = None, extra_tokens: torch.Tensor | None = None,
                extra_ids: torch.Tensor | None = None, patch_size: int | None = None,
                taps: list[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Encode the kept patch tokens (all N when `ids_keep` is None).

        Returns (B, 1 + K, D) tokens (class token first) after the final norm, or with `pool`
        ("token": the class token, "avg": mean of the patch tokens) (B, D) features. `attn_mask`
        is passed to every block (timm semantics). `extra_tokens` (1 or B, M, D), e.g. mask or
        query tokens, are appended after the patch tokens, each given the position embedding of
        patch `extra_ids` (B, M); the output then has 1 + K + M tokens. `patch_size` (default: the
        model's) cuts the image into that many pixels per patch (see `embed`); `ids_keep` and
        `extra_ids` index that grid. A callable `ids_keep` is called on the embedded patch tokens
        (B, N, D) and returns the ids: masks chosen from the encoder's own embeddings (MLO-MAE).
        `taps` (1-based block numbers, e.g. [6, 8, 10, 12]) returns the list of those blocks'
        outputs instead, without the final norm (D-iGPT's decoders read them); blocks after the
        last tap are not run. Call the module, not a helper method: ZeRO-3 gathers the class token,
        position embeddings and patch projection in this module's forward hook.
        """
        tokens = self.embed(images, patch_size)
        if callable(ids_keep):
            ids_keep = ids_keep(tokens)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        parts = [cls, tokens]
        if extra_tokens is not None:
            grid = patch_grid(images.shape[-2:], patch_size or self.patch_size)
            positions = gather_tokens(self.patch_positions(grid).expand(tokens.shape[0], -1, -1), extra_ids)
            parts.append(extra_tokens.to(tokens.dtype) + positions)
        x = torch.cat(parts, dim=1)
        if attn_mask is not None or taps is not None:
            outputs = {}
            for number, block in enumerate(self.vit.blocks[:max(taps) if taps else None], start=1):
                if self.vit.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, attn_mask=attn_mask)
                else:
                    x = block(x, attn_mask=attn_mask)
                if taps and number in taps:
                    outputs[number] = x
            if taps is not None:
                return [outputs[number] for number in taps]
        elif self.vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.vit.blocks, x)
        else:
            x = self.vit.blocks(x)
        x = self.vit.norm(x)
        if pool is None:
            return x
        return x[:, 0] if pool == "token" else x[:, 1:].mean(dim=1)

    def no_weight_decay(self) -> set[str]:
        return {"vit." + n for n in self.vit.no_weight_decay()}

    def forward_flops(self, tokens: int) -> float:
        """Forward FLOPs per image with `tokens` patch tokens kept (plus the class token)."""
        c = self.cfg
        embed = 2 * self.num_patches * 3 * c.patch_size**2 * c.embed_dim
        return embed + vit_forward_flops(tokens + 1, c.embed_dim, c.depth, c.mlp_ratio)

    def timm_spec(self) -> tuple[str, dict]:
        """The timm model name and keyword overrides that build this encoder's architecture
        (with `init_values` when the blocks have LayerScale, so timm builds `ls1.gamma` / `ls2.gamma`)."""
        name, kwargs = self._timm_architecture()
        if self.cfg.init_values:
            kwargs["init_values"] = self.cfg.init_values
        return name, kwargs

    def _timm_architecture(self) -> tuple[str, dict]:
        c = self.cfg
        size = TIMM_SIZES.get((c.embed_dim, c.depth, c.num_heads))
        if size:
            name = f"vit_{size}_patch{c.patch_size}_{c.img_size}"
            if name in timm.list_models(name):
                return name, {}
            # e.g. huge/16 or tiny/14: the size's registered 224 model with the patch and image size changed
            for patch in (c.patch_size, 16, 14):
                name = f"vit_{size}_patch{patch}_224"
                if name in timm.list_models(name):
                    return name, {"img_size": c.img_size, "patch_size": c.patch_size}
        # not a timm size: timm's base model with every architecture argument given
        return "vit_base_patch16_224", {"img_size": c.img_size, "patch_size": c.patch_size, "embed_dim": c.embed_dim,
                                        "depth": c.depth, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio}


def pooled_features(encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    """Pooled float32 features of a frozen encoder; bf16 autocast on GPU (the features are normalised later)."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=images.device.type == "cuda"):
        return encoder(images, pool=pool).float()
