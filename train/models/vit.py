"""The shared ViT encoder: timm's VisionTransformer, run on any subset of patch tokens of an image of any
size that is a multiple of the patch size (position embeddings resampled, as DINO's local crops need).

`ViTEncoder.vit` is a plain `timm.models.vision_transformer.VisionTransformer` (no head), so its
state dict is exactly what `timm.create_model(timm_name, num_classes=0)` loads.
"""

import timm
import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from train.config import ModelConfig
from train.models.masking import gather_tokens

# (embed_dim, depth, num_heads) -> timm size name
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base", (1024, 24, 16): "large",
              (1280, 32, 16): "huge", (1664, 48, 16): "giant"}


def sincos_pos_embed(grid: tuple[int, int], dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2D sin-cos position embeddings (1, [1 +] H*W, dim), the class-token slot all zeros."""
    pos = build_sincos2d_pos_embed(list(grid), dim)
    if cls_token:
        pos = torch.cat([torch.zeros(1, dim), pos], dim=0)
    return pos.unsqueeze(0)


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
            drop_path_rate=cfg.drop_path, weight_init="skip",
        )
        self.vit.patch_embed.strict_img_size = False  # any multiple of the patch size (smaller crops)
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
        # forward() reads these outside vit.forward(): tell ZeRO-3 to gather them for this module
        import deepspeed

        for param in (self.vit.cls_token, self.vit.pos_embed):
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

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embeddings, no class token: (B, N, D).

        An image of another size than `model.img_size` (a multiple of the patch size) gets the position
        embeddings resampled to its grid: bicubic without antialiasing, as DINO interpolates for its crops.
        """
        x = self.vit.patch_embed(images.to(self.vit.patch_embed.proj.weight.dtype))
        grid = [images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size]
        pos = resample_abs_pos_embed(self.vit.pos_embed[:, 1:], grid, list(self.grid_size), num_prefix_tokens=0,
                                     antialias=False)
        return x + pos

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor | None = None, pool: str | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the kept patch tokens (all N when `ids_keep` is None).

        Returns (B, 1 + K, D) tokens (class token first) after the final norm, or with `pool`
        ("token": the class token, "avg": mean of the patch tokens) (B, D) features. `attn_mask`
        is passed to every block (timm semantics). Call the module, not a helper method: ZeRO-3
        gathers the class token and position embeddings in this module's forward hook.
        """
        tokens = self.embed(images)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        if attn_mask is not None:
            for block in self.vit.blocks:
                x = block(x, attn_mask=attn_mask)
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
        """The timm model name and keyword overrides that build this encoder's architecture."""
        c = self.cfg
        size = TIMM_SIZES.get((c.embed_dim, c.depth, c.num_heads))
        name = f"vit_{size}_patch{c.patch_size}_{c.img_size}" if size else ""
        if name and name in timm.list_models(name):
            return name, {}
        base = f"vit_{size or 'base'}_patch16_224"
        return base, {"img_size": c.img_size, "patch_size": c.patch_size, "embed_dim": c.embed_dim,
                      "depth": c.depth, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio}
