"""Light decoders: MAE's (kept tokens + mask tokens in place, fixed sin-cos positions, timm blocks) and a feature
predictor (encoder tokens + one positional query per target under an attention mask; D-iGPT).

MAE's decoder as facebookresearch/mae `models_mae.py`: LayerNorm eps 1e-6, the position table in MAE's channel
layout and saved with the weights (`pos_embed`, a buffer: MAE's `decoder_pos_embed` with requires_grad False),
so an official decoder's weights load and reconstruct as there (train/weights.py maps the names).
"""

from functools import partial

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from train.models.masking import gather_tokens, restore_tokens
from train.models.vit import init_mae_weights, sincos_pos_embed, timm_sincos_pos_embed, vit_forward_flops

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def decoder_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> nn.Sequential:
    return nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm) for _ in range(depth)])


class MAEDecoder(nn.Module):
    def __init__(self, grid_size: tuple[int, int], encoder_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, out_dim: int = 768, mlp_ratio: float = 4.0):
        super().__init__()
        self.dim, self.depth, self.mlp_ratio = dim, depth, mlp_ratio
        self.grid_size = tuple(grid_size)
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid_size, dim))
        self.blocks = decoder_blocks(dim, depth, num_heads, mlp_ratio)
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_load_state_dict_pre_hook(self._positions_of_old_checkpoints)

    def _positions_of_old_checkpoints(self, module, state_dict, prefix, *args) -> None:
        """Checkpoints written before the table was saved lack `pos_embed`: they were trained with
        timm's channel layout, which is put back for them."""
        if prefix + "pos_embed" not in state_dict:
            state_dict[prefix + "pos_embed"] = timm_sincos_pos_embed(self.grid_size, self.dim).to(self.pos_embed)

    def tokens(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size=None) -> torch.Tensor:
        """The decoder's input (B, 1 + N, D): embedded kept tokens and mask tokens in place, plus positions.

        `grid_size`: the patch grid when it is not the decoder's own (patch scaling); the position
        embeddings are resampled to it.
        """
        x = self.embed(latent)
        patches = restore_tokens(x[:, 1:], ids_restore, self.mask_token)
        pos = self.pos_embed
        if grid_size is not None and tuple(grid_size) != self.grid_size:
            pos = resample_abs_pos_embed(pos, list(grid_size), list(self.grid_size), num_prefix_tokens=1)
        return torch.cat([x[:, :1], patches], dim=1) + pos.to(x.dtype)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks, norm and prediction on the decoder's input tokens -> (B, N, out_dim), class token dropped."""
        return self.pred(self.norm(self.blocks(x))[:, 1:])

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_size=None, with_tokens: bool = False):
        """latent (B, 1 + K, De) from the encoder -> predictions for all N patches (B, N, out_dim), and with
        `with_tokens` also the decoder's input tokens (HPM's loss predictor shares them). Call the module,
        not `tokens`: ZeRO-3 gathers `mask_token` in this module's forward hook."""
        x = self.tokens(latent, ids_restore, grid_size)
        return (self.predict(x), x) if with_tokens else self.predict(x)

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
        self.register_buffer("pos_embed", timm_sincos_pos_embed(grid, dim), persistent=False)
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


