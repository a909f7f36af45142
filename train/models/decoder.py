"""Light decoders: MAE's (kept tokens + mask tokens in place, fixed sin-cos positions, timm blocks) and a feature
predictor (encoder tokens + one positional query per target under an attention mask; D-iGPT)."""

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from train.models.masking import gather_tokens, restore_tokens
from train.models.vit import init_mae_weights, sincos_pos_embed, vit_forward_flops


class MAEDecoder(nn.Module):
    def __init__(self, grid_size: tuple[int, int], encoder_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, out_dim: int = 768, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.depth, self.mlp_ratio = dim, depth, mlp_ratio
        self.grid_size = tuple(grid_size)
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size=None) -> torch.Tensor:
        """latent (B, 1 + K, De) from the encoder -> predictions for all N patches (B, N, out_dim).

        `grid_size`: the patch grid when it is not the decoder's own (patch scaling); the position
        embeddings are resampled to it.
        """
        x = self.embed(latent)
        patches = restore_tokens(x[:, 1:], ids_restore, self.mask_token)
        pos = self.pos_embed
        if grid_size is not None and tuple(grid_size) != self.grid_size:
            pos = resample_abs_pos_embed(pos, list(grid_size), list(self.grid_size), num_prefix_tokens=1)
        x = torch.cat([x[:, :1], patches], dim=1) + pos.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x[:, 1:])

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def forward_flops(self, num_patches: int | None = None) -> float:
        return vit_forward_flops((num_patches or self.num_patches) + 1, self.dim, self.depth, self.mlp_ratio)


class FeaturePredictor(nn.Module):
    """Light decoder: encoder tokens + one query per target (a learned token + the target's sin-cos
    position; the class query last) through timm blocks under a mask -> teacher-sized features."""

    def __init__(self, grid: tuple[int, int], encoder_dim: int, dim: int, depth: int, num_heads: int, out_dim: int):
        super().__init__()
        self.dim, self.depth = dim, depth
        self.embed = nn.Linear(encoder_dim, dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim), persistent=False)
        self.blocks = nn.ModuleList([Block(dim, num_heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, latent: torch.Tensor, target_ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L, De), target_ids (B, Q) patch indices -> predictions (B, Q + 1, out_dim)."""
        x = self.embed(latent)
        positions = gather_tokens(self.pos_embed[:, 1:].expand(x.shape[0], -1, -1), target_ids)
        queries = torch.cat([self.query + positions, (self.query + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)],
                            dim=1)
        x = torch.cat([x, queries.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.pred(self.norm(x[:, latent.shape[1]:]))

    def no_weight_decay(self) -> set[str]:
        return {"query"}

    def forward_flops(self, tokens: int) -> float:
        return vit_forward_flops(tokens, self.dim, self.depth)


