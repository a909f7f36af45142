"""D-iGPT (Ren et al., 2024): autoregressive prediction of a frozen CLIP teacher's features.

As the official code (OliverRensu/D-iGPT): the patch grid is cut into `segments` x `segments`
square segments (2 x 2 segments of 7 x 7 on a 14 x 14 grid), put in a random order per image
(or raster order); the encoder reads all segments but the last, block-causally (a patch sees its
own segment and the earlier ones; the class token sees everything and no patch sees it). Two
decoders predict, from the segments up to each one, the teacher's features of the NEXT segment
and of the CURRENT (visible) segment, plus the teacher's class token from everything; loss =
2 - 2 cos on L2-normalised features, next + visible.

Encoder -> decoders as the official `forward_encoder` / `DecoderBlock`: the outputs of encoder
blocks depth x {1/2, 2/3, 5/6, 1} (6/8/10/12 for ViT-B; `method.taps`), each through ONE LayerNorm
per decoder (the official `ModuleList([LayerNorm] * 4)` repeats one module), concatenated and
projected by one Linear to decoder_depth x decoder_dim: a separate latent for every decoder layer.
Each decoder layer: masked self-attention over the queries, masked cross-attention to its latent,
MLP (pre-norm). Queries: a learned token + the sin-cos decoder position of the patch to predict
(the class query last). The encoder's final norm is not used in pretraining (frozen at its unit
init, so the exported encoder is the timm ViT with that norm).

Differences from the official code: no patch sees the class token (the official reflect padding of
the mask lets the third segment's patches see it); teacher features are resampled to the student's
grid instead of upsampling predictions (7 x 7 -> 8 x 8) to the teacher's.

Compression (train/compression.py): token dropout keeps the same random `keep_ratio` share of every
segment's patches, so the block-causal structure stays and each segment shrinks alike (inputs and
NEXT / VISIBLE targets are the kept patches). Patch scaling is not supported: segments, the
teacher's resampled features and the decoders' positions are laid out on the model's own grid.
"""

from dataclasses import dataclass, field

import torch

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.methods.base import Method, register
from train.models.decoder import FeaturePredictor
from train.models.losses import feature_loss
from train.models.masking import gather_tokens
from train.models.vit import ViTEncoder
from train.teachers.clip import FrozenTeacher, TeacherConfig

ORDERS = ("random", "raster")
LOSSES = ("cosine", "smooth_l1")


@dataclass
class DiGPTConfig:
    name: str = "digpt"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    segments: int = 2  # segments per side of the patch grid (D-iGPT: 2, i.e. four 7x7 segments of 14x14)
    order: str = "random"  # segment order per image: "random" (D-iGPT) or "raster"
    loss: str = "cosine"  # "cosine": 2 - 2 cos (D-iGPT) or "smooth_l1" against layer-normalised teacher features
    decoder_dim: int = 1024  # D-iGPT ViT-B: 1024 wide, 2 deep, 32 heads
    decoder_depth: int = 2
    decoder_heads: int = 32
    taps: list[int] = field(default_factory=list)  # encoder blocks (1-based) the decoders read; [] = depth x
    #                                                {1/2, 2/3, 5/6, 1}, i.e. 6/8/10/12 for ViT-B

    def validate(self, cfg: Config) -> None:
        self.teacher.validate()
        depth = cfg.model.depth
        if self.taps and (sorted(self.taps) != self.taps or not 1 <= self.taps[0] <= self.taps[-1] <= depth):
            raise ConfigError(f"method.taps={self.taps} must be block numbers in ascending order, in [1, {depth}]")
        grid = cfg.model.img_size // cfg.model.patch_size
        if self.segments < 2 or grid % self.segments:
            raise ConfigError(f"method.segments={self.segments} must be >= 2 and divide the {grid}x{grid} patch grid")
        if self.order not in ORDERS:
            raise ConfigError(f"method.order={self.order!r}: choose one of {ORDERS}")
        if self.loss not in LOSSES:
            raise ConfigError(f"method.loss={self.loss!r}: choose one of {LOSSES}")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigError(f"method.decoder_dim={self.decoder_dim} must be divisible by method.decoder_heads="
                              f"{self.decoder_heads} and by 4 (sin-cos positions)")


def segment_patches(grid: int, segments: int) -> torch.Tensor:
    """(segments**2, side**2) raster patch indices of each square segment, segments in raster order."""
    side = grid // segments
    index = torch.arange(grid * grid).view(segments, side, segments, side)
    return index.permute(0, 2, 1, 3).reshape(segments * segments, side * side)


def tap_blocks(depth: int, taps: list[int] | None = None) -> list[int]:
    """The 1-based encoder blocks whose outputs feed the decoders: `taps`, or depth x {1/2, 2/3, 5/6, 1} rounded."""
    return list(taps) if taps else [max(1, (depth * k + 3) // 6) for k in (3, 4, 5, 6)]


def context_mask(row_context: torch.Tensor, col_context: torch.Tensor) -> torch.Tensor:
    """True where a key's context (the last segment it needs) is at most the query's: block-causal attention."""
    return col_context[None, :] <= row_context[:, None]


def causal_masks(num_input_segments: int, segment_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (True: may attend) of the encoder over [class token, input patches], of the decoders'
    self-attention over [queries, class query] and of their cross-attention from those queries to the latent.

    Patches and queries of input segment j have context j; the class token and the class query have
    context "all" (no patch or patch query sees them).
    """
    everything = torch.tensor([num_input_segments])
    segment_of = torch.arange(num_input_segments).repeat_interleave(segment_len)
    latent = torch.cat([everything, segment_of])
    queries = torch.cat([segment_of, everything])
    return context_mask(latent, latent), context_mask(queries, queries), context_mask(queries, latent)


def digpt_targets(teacher_cls: torch.Tensor, teacher_patches: torch.Tensor, order: torch.Tensor,
                  segment_len: int, num_input: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features the decoders' queries are matched with: NEXT (the patches one segment after each
    input patch's, in order) and VISIBLE (the input patches themselves), each followed by the class token."""
    cls = teacher_cls[:, None]
    upcoming = gather_tokens(teacher_patches, order[:, segment_len:segment_len + num_input])
    visible = gather_tokens(teacher_patches, order[:, :num_input])
    return torch.cat([upcoming, cls], dim=1), torch.cat([visible, cls], dim=1)


@register("digpt")
class DiGPT(Method):
    Config = DiGPTConfig
    supported_compression = ("token_dropout",)

    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.method
        self.cfg = m
        self.encoder = ViTEncoder(cfg.model)
        grid = self.encoder.grid_size
        self.register_buffer("segments", segment_patches(grid[0], m.segments), persistent=False)
        self.segment_len = self.segments.shape[1]
        self.num_input = (self.segments.shape[0] - 1) * self.segment_len  # the last segment is only a target
        masks = causal_masks(self.segments.shape[0] - 1, self.segment_len)
        for name, mask in zip(("encoder_mask", "self_mask", "cross_mask"), masks):
            self.register_buffer(name, mask, persistent=False)
        self.taps = tap_blocks(cfg.model.depth, m.taps)
        # the decoders read the tapped blocks' raw outputs: the encoder's final norm stays at its unit init,
        # frozen, so the exported encoder is still exactly the timm ViT
        self.encoder.vit.norm.requires_grad_(False)
        # the frozen teacher is a plain attribute: DeepSpeed never casts, partitions, optimizes or saves it
        self.teacher = FrozenTeacher(m.teacher, grid, cfg.data.mean, cfg.data.std)
        args = (grid, cfg.model.embed_dim, len(self.taps), m.decoder_dim, m.decoder_depth, m.decoder_heads,
                self.teacher.out_dim)
        self.next_decoder = FeaturePredictor(*args)
        self.visible_decoder = FeaturePredictor(*args)

    def patch_order(self, batch: int, device: torch.device, compression: Setting = FULL) -> torch.Tensor:
        """(B, S x L) patch indices, segment by segment: segments in a random order per image, or raster;
        under token dropout, L = the kept share of each segment's patches (a random subset of each)."""
        segments = self.segments.to(device)
        if self.cfg.order == "raster":
            order = segments.expand(batch, -1, -1)
        else:
            order = segments[torch.argsort(torch.rand(batch, len(segments), device=device), dim=1)]
        num_segments = len(segments)
        keep = compression.keep_ids(batch * num_segments, self.segment_len, device)
        if keep is not None:
            order = order.reshape(batch * num_segments, self.segment_len).gather(1, keep).view(batch, num_segments, -1)
        return order.flatten(1)

    def layout(self, order: torch.Tensor) -> tuple[int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(segment length, input patches, (encoder, self-attention, cross-attention) masks) of an order (B, S x L)."""
        segment_len = order.shape[1] // self.segments.shape[0]
        if segment_len == self.segment_len:
            return segment_len, self.num_input, (self.encoder_mask, self.self_mask, self.cross_mask)
        masks = causal_masks(self.segments.shape[0] - 1, segment_len)
        return segment_len, order.shape[1] - segment_len, tuple(mask.to(order.device) for mask in masks)

    def predict(self, images: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next, visible) feature predictions (B, num_input + 1, C) for the targets of `digpt_targets`."""
        segment_len, num_input, (encoder_mask, self_mask, cross_mask) = self.layout(order)
        features = self.encoder(images, ids_keep=order[:, :num_input], attn_mask=encoder_mask, taps=self.taps)
        upcoming = order[:, segment_len:segment_len + num_input]
        return (self.next_decoder(features, upcoming, self_mask, cross_mask),
                self.visible_decoder(features, order[:, :num_input], self_mask, cross_mask))

    def forward(self, batch: dict, step: int = 0):
        images = batch["images"]
        teacher_cls, teacher_patches = self.teacher(images)
        order = self.patch_order(images.shape[0], images.device, batch.get("compression", FULL))
        pred_next, pred_visible = self.predict(images, order)
        segment_len, num_input = self.layout(order)[:2]
        target_next, target_visible = digpt_targets(teacher_cls, teacher_patches, order, segment_len, num_input)
        loss_next, cos_next = feature_loss(pred_next, target_next, self.cfg.loss)
        loss_visible, cos_visible = feature_loss(pred_visible, target_visible, self.cfg.loss)
        loss = loss_next + loss_visible
        return loss, {"loss": loss.detach(), "loss_next": loss_next.detach(), "loss_visible": loss_visible.detach(),
                      "cos_next": cos_next.detach(), "cos_visible": cos_visible.detach()}

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return (self.segments.shape[0] - 1) * compression.num_kept(self.segment_len)

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Training FLOPs per image: encoder (up to the last tap) and both decoders x 3, plus the teacher's forward."""
        num_input = self.tokens_per_image(compression)
        encoder = self.encoder.forward_flops(num_input) * self.taps[-1] / self.encoder.cfg.depth
        decoders = 2 * self.next_decoder.forward_flops(num_input + 1, num_input + 1)
        student = encoder + decoders
        return 3 * student + self.teacher.forward_flops()
