"""Light decoders: MAE's (kept tokens + mask tokens in place, fixed sin-cos positions, timm blocks) and a feature
predictor (positional queries per target, self-attention among them and cross-attention to per-layer latents made
from tapped encoder blocks, under attention masks; D-iGPT's official DecoderBlock).

MAE's decoder as facebookresearch/mae `models_mae.py`: LayerNorm eps 1e-6, the position table in MAE's channel
layout and saved with the weights (`pos_embed`, a buffer: MAE's `decoder_pos_embed` with requires_grad False),
so an official decoder's weights load and reconstruct as there (train/weights.py maps the names).
"""

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, resample_abs_pos_embed
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


class CrossAttention(nn.Module):
    """Multi-head attention of queries (B, Q, C) to a latent (B, L, C) under a boolean mask (Q, L)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, latent: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        k, v = self.kv(latent).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class DecoderBlock(nn.Module):
    """D-iGPT's decoder layer (official vit.py DecoderBlock): pre-norm masked self-attention over the queries,
    masked cross-attention to this layer's latent (normed by the block), MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm_query = nn.LayerNorm(dim, eps=1e-6)
        self.norm_latent = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, latent: torch.Tensor, self_mask: torch.Tensor,
                cross_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=self_mask)
        x = x + self.cross_attn(self.norm_query(x), self.norm_latent(latent), cross_mask)
        return x + self.mlp(self.norm2(x))


class FeaturePredictor(nn.Module):
    """One D-iGPT decoder: tapped encoder outputs -> one LayerNorm (shared by the taps) -> concatenated ->
    one Linear to `depth` latents of width `dim` (one per decoder layer); queries (a learned token + the
    target's sin-cos position; the class query last) through `DecoderBlock`s -> teacher-sized features."""

    def __init__(self, grid: tuple[int, int], encoder_dim: int, num_taps: int, dim: int, depth: int, num_heads: int,
                 out_dim: int):
        super().__init__()
        self.dim, self.depth, self.num_taps = dim, depth, num_taps
        self.encoder_norm = nn.LayerNorm(encoder_dim)
        self.encoder_to_latents = nn.Linear(num_taps * encoder_dim, depth * dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, dim), persistent=False)
        self.blocks = nn.ModuleList([DecoderBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        init_mae_weights(self)
        nn.init.trunc_normal_(self.query, std=0.02)

    def latents(self, features: list[torch.Tensor]) -> torch.Tensor:
        """(B, L, dim, depth) latents from the tapped encoder outputs (each (B, L, De)); layer i reads [..., i]
        (the official `enc2dec(...).reshape(B, -1, dim, depth)` layout)."""
        x = torch.cat([self.encoder_norm(f) for f in features], dim=-1)
        return self.encoder_to_latents(x).unflatten(-1, (self.dim, self.depth))

    def forward(self, features: list[torch.Tensor], target_ids: torch.Tensor, self_mask: torch.Tensor,
                cross_mask: torch.Tensor) -> torch.Tensor:
        """Tapped encoder outputs, target_ids (B, Q) patch indices -> predictions (B, Q + 1, out_dim)."""
        latents = self.latents(features)
        batch = target_ids.shape[0]
        positions = gather_tokens(self.pos_embed[:, 1:].expand(batch, -1, -1), target_ids)
        x = torch.cat([self.query + positions, (self.query + self.pos_embed[:, :1]).expand(batch, -1, -1)], dim=1)
        x = x.to(latents.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, latents[..., i], self_mask, cross_mask)
        return self.pred(self.norm(x))

    def no_weight_decay(self) -> set[str]:
        return {"query"}

    def forward_flops(self, queries: int, latent: int) -> float:
        """Forward FLOPs (2 per multiply-add) for `queries` queries over a latent of `latent` tokens."""
        d = self.dim
        embed = 2 * latent * self.encoder_to_latents.in_features * self.encoder_to_latents.out_features
        per_block = (2 * queries * d * d * (4 + 2 + 8) + 2 * latent * d * 2 * d  # qkv+proj, q+proj, MLP; kv
                     + 4 * queries * queries * d + 4 * queries * latent * d)  # attention scores and sums
        return embed + self.depth * per_block + 2 * queries * d * self.pred.out_features
