"""MLO-MAE (Guo et al., TMLR 2024): MAE whose masks come from a masking network trained, by
multi-level optimization, to help a downstream classifier. Defaults as the official code
(Alexiland/MLO-MAE, main_imagenet.py, model_mae_new.py).

Level 1 (the engine's DeepSpeed step): encoder + decoder minimise the MAE loss on the masks of the
masking network, each masked patch's loss weighted by its mask probability p, sum m p l / sum m. The
official masking network (`method.mask_net=mlp`, `MLOPatchMasking`) is an MLP on the MAE's own patch
embeddings + positions, so this loss also trains `patch_embed` through p (the masking network's own
parameters get no level-1 gradient).
Level 2 (`aux_step`): a classification head (LayerNorm + Dropout + Linear on the class token) takes an
AdamW step on a labelled batch, on features of the current encoder.
Level 3 (`aux_step`): the masking network takes an AdamW step along the hypergradient of the
cross-entropy on a held-out labelled batch, through the dependence of the encoder (level 1) on the
masks (and, as an option, of the head (level 2)).

Hypergradient: DARTS's one-step unroll, evaluated at the current weights as Betty's `darts` (the
official code's) does. With the virtual steps theta+ = theta - xi grad_theta L_rec(theta, lambda)
and phi+ = phi - eta grad_phi L_cls(theta+, phi),

    d L_val(theta+, phi+) / d lambda = -xi  d2 L_rec / d lambda d theta . v
    v = grad_theta L_val - eta grad_theta < grad_phi L_cls(theta, phi), grad_phi L_val >

(`method.unroll_lr` = xi, `method.head_unroll_lr` = eta; eta = 0 is the official code, whose
hypergradient reaches the masks through the encoder only, u2l = {mask: [pretrain]}). The mixed term
is grad_lambda of the derivative of L_rec along v; the directional derivatives along v of the
per-patch losses and of the patch embeddings come from one forward-mode pass (`torch.func.jvp`).
That is exact in any precision, where DARTS's finite difference at theta +- eps v rounds to noise in
bf16.

Masks: the N - num_keep patches of highest probability (`method.mask_temperature` 0, official); a
temperature > 0 draws them by Gumbel-top-k instead. Gradient estimator: pathwise through the loss
weights p with the masks held fixed (the official estimator); the discrete choice carries no
gradient. Not the paper's, as options: `mask_net=vit` (a small ViT on the image),
`mask_temperature` > 0, `normalize_mask_weights` (sum m p l / sum m p), `head_unroll_lr` > 0.

What DeepSpeed owns: the encoder and decoder (level 1, sharded by every ZeRO stage). The masking
network, the head, their optimizers and an fp32 replica of encoder + decoder live outside the module
tree (`UpperLevels`), replicated on every rank with all-reduced gradients: they are small, except
the replica (one full fp32 copy of encoder + decoder per rank, refreshed from the sharded weights
before every level-2/3 step) on which the hypergradient is computed, so it never touches
DeepSpeed's gradients or optimizer state.
"""

import contextlib
import logging
import random
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_pipeline.stream import resolve_shards
from train.compression import FULL, Setting, drop_visible
from train.config import Config, ConfigError, ModelConfig
from train.distributed import global_batch
from train.methods.base import Method, register
from train.methods.mae import MAEConfig
from train.models.decoder import MAEDecoder
from train.models.ema import EMA
from train.models.losses import per_patch_loss
from train.models.masking import masking_from_scores
from train.models.patches import patchify, unpatchify
from train.models.vit import ViTEncoder
from train.optim import peak_lr, set_lr

log = logging.getLogger("train")


@dataclass
class MLOMAEConfig(MAEConfig):
    name: str = "mlo_mae"
    # the masking network (level 3's parameters), one mask logit per patch. "mlp" (official): Linear(N x D,
    # hidden) - ReLU - Linear(hidden, N) on the MAE's own patch embeddings + positions, so level 1 also
    # trains patch_embed through the mask probabilities; "vit" (not the paper's): a small ViT on the image
    mask_net: str = "mlp"
    mask_net_hidden: int = 512  # mlp
    mask_net_dim: int = 192  # vit
    mask_net_depth: int = 2  # vit
    mask_net_heads: int = 3  # vit
    mask_temperature: float = 0.0  # 0: deterministic top-k (official); > 0: Gumbel-top-k (not the paper's)
    normalize_mask_weights: bool = False  # false: sum m p l / sum m (official); true: / sum m p (not the paper's)
    # levels 2 and 3: lr = base lr x global level-1 batch / 256 (at the official batch 256 these are the
    # official absolute lrs), same warmup + cosine shape as level 1; AdamW (0.9, 0.95) with weight decay on
    # every parameter, as the official torch.optim.AdamW(module.parameters()) (torch's default 0.01)
    head_base_lr: float = 5e-4
    head_weight_decay: float = 0.01
    head_dropout: float = 0.1  # level-2 head: LayerNorm - Dropout - Linear (official FinetuneVisionTransformer)
    mask_base_lr: float = 5e-5  # 0 freezes the masking network: random-mask MAE through the same code
    mask_weight_decay: float = 0.01
    downstream_train: str = ""  # labelled shards (manifest or pattern) for level 2; "" = data.train
    downstream_val: str = ""  # labelled held-out shards for level 3; "" = hold out val_fraction of them
    val_fraction: float = 0.2  # share of downstream_train's shards held out for level 3 (never seen by level 2)
    downstream_batch_size: int = 0  # per rank, for each of levels 2 and 3; 0 = data.batch_size
    num_classes: int = 0  # 0: the class list of downstream_train's manifest
    # hypergradient: DARTS one-step unroll, mixed derivative by forward-mode AD
    hyper_every: int = 2  # levels 2 and 3 step after every N-th level-1 step (official unroll steps 2/1/1)
    unroll_lr: float = 1.0  # xi, level 1's virtual SGD step; only scales the hypergradient (AdamW is scale-free)
    head_unroll_lr: float = 0.0  # eta, the head's virtual SGD step: weight of the head path; 0 = official

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
        keep = int(patches * (1 - self.mask_ratio))
        if not 0 < keep < patches:
            raise ConfigError(f"method.mask_ratio={self.mask_ratio} must keep between 1 and {patches - 1} of the "
                              f"{patches} patches (it keeps {keep})")
        if self.mask_net not in ("mlp", "vit"):
            raise ConfigError(f"method.mask_net={self.mask_net!r}: choose 'mlp' (official) or 'vit'")
        if self.mask_net_hidden < 1 or not 0 <= self.head_dropout < 1:
            raise ConfigError(f"method.mask_net_hidden={self.mask_net_hidden} must be >= 1 and "
                              f"method.head_dropout={self.head_dropout} in [0, 1)")
        if self.mask_net_dim % self.mask_net_heads or self.mask_net_dim % 4:
            raise ConfigError(f"method.mask_net_dim={self.mask_net_dim} must be divisible by "
                              f"method.mask_net_heads={self.mask_net_heads} and by 4 (sincos positions)")
        if self.mask_net_depth < 1:
            raise ConfigError(f"method.mask_net_depth={self.mask_net_depth} must be >= 1")
        if self.mask_temperature < 0:
            raise ConfigError(f"method.mask_temperature={self.mask_temperature} must be >= 0")
        if self.head_base_lr <= 0 or self.mask_base_lr < 0:
            raise ConfigError(f"method.head_base_lr={self.head_base_lr} must be > 0 and "
                              f"method.mask_base_lr={self.mask_base_lr} >= 0")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"method.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.downstream_batch_size < 0 or self.num_classes < 0:
            raise ConfigError("method.downstream_batch_size and method.num_classes must be >= 0")
        if self.hyper_every < 1 or self.unroll_lr <= 0 or self.head_unroll_lr < 0:
            raise ConfigError(f"method.hyper_every={self.hyper_every} must be >= 1, method.unroll_lr="
                              f"{self.unroll_lr} > 0 and method.head_unroll_lr={self.head_unroll_lr} >= 0")
        if cfg.data.views != "single":
            raise ConfigError(f"data.views={cfg.data.views!r}: mlo_mae trains on single views ('single')")
        if cfg.data.val and self.downstream_val == cfg.data.val:
            raise ConfigError(f"method.downstream_val={self.downstream_val} is the benchmark's data.val: the masks "
                              "must be tuned on a split held out from the training set (leave it empty to hold out "
                              "method.val_fraction of the labelled training shards)")


def sample_masks(logits: torch.Tensor, num_keep: int, temperature: float, generator: torch.Generator | None = None):
    """Mask the N - num_keep patches of highest Gumbel-perturbed logit / temperature (0: highest logit).

    Returns `ids_keep`, `ids_restore`, `mask` (1 = masked) as `masking.random_masking`.
    """
    scores = logits.detach().float()
    if temperature > 0:
        uniform = torch.rand(scores.shape, device=scores.device, generator=generator)
        gumbel = -torch.log(-torch.log(uniform.clamp_(1e-12, 1 - 1e-7)))
        scores = scores / temperature + gumbel
    return masking_from_scores(scores, num_keep)  # keeps the lowest scores, masks the rest


def weighted_mae_loss(per_patch: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | float,
                      normalize: bool = False) -> torch.Tensor:
    """MAE's loss on the masked patches, each weighted by its mask probability w:
    sum_i m_i w_i l_i / sum_i m_i, or with `normalize` the w-weighted mean sum_i m_i w_i l_i / sum_i m_i w_i."""
    masked_weights = weights * mask
    return (per_patch * masked_weights).sum() / (masked_weights if normalize else mask).sum()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


@contextlib.contextmanager
def native_linear():
    """torch's own `F.linear` for the duration. DeepSpeed ZeRO-3 replaces it process-wide by an autograd
    Function without a forward-mode rule (deepspeed/runtime/zero/linear.py, `memory_efficient_linear`);
    the work outside DeepSpeed needs the native one."""
    patched = F.linear
    F.linear = torch._C._nn.linear
    try:
        yield
    finally:
        F.linear = patched


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks of each tensor (one collective on a flat buffer); unchanged on one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(tensors)
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [chunk.view_as(t).to(t.dtype) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def downstream_direction(params: list[torch.Tensor], head: nn.Module, head_before: dict[str, torch.Tensor],
                         train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                         val_labels: torch.Tensor, head_unroll_lr: float):
    """v = grad_theta [L_val(theta, phi) - eta < grad_phi L_cls(theta, phi_before), sg(grad_phi L_val) >].

    `head` holds phi, the head after its level-2 step from `head_before` on `train_features`; the
    features carry their graph to the encoder parameters `params` (theta). Returns (v averaged
    over ranks, held-out loss, held-out accuracy).
    """
    val_logits = head(val_features)
    val_loss = F.cross_entropy(val_logits, val_labels)
    objective = val_loss
    if head_unroll_lr > 0:
        g_val = all_reduce_mean(torch.autograd.grad(val_loss, list(head.parameters()), retain_graph=True))
        before = {name: t.detach().requires_grad_() for name, t in head_before.items()}
        train_loss = F.cross_entropy(functional_call(head, before, (train_features,)), train_labels)
        g_train = torch.autograd.grad(train_loss, list(before.values()), create_graph=True)
        objective = objective - head_unroll_lr * sum((gt * gv).sum() for gt, gv in zip(g_train, g_val))
    v = all_reduce_mean(torch.autograd.grad(objective, params))
    accuracy = (val_logits.argmax(dim=-1) == val_labels).float().mean()
    return v, val_loss.detach(), accuracy


def mask_hypergradient(encoder: ViTEncoder, decoder: MAEDecoder, masker: nn.Module, images: torch.Tensor,
                       ids_keep: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor,
                       v: list[torch.Tensor], unroll_lr: float, norm_pix_loss: bool,
                       normalize_weights: bool) -> list[torch.Tensor]:
    """-xi d2 L_rec / d lambda d theta . v on the level-1 batch (its masks fixed), for `trainable(masker)`.

    `v` pairs with `trainable(encoder)`. The mixed term is grad_lambda of D_v L_rec, the derivative of
    the level-1 loss along v, which is d/dt L_rec(l + t dl, p(e + t de)) at t = 0: the directional
    derivatives dl of the per-patch losses and de of the patch embeddings (the official masking
    network's input, so its path into patch_embed counts) come from one forward-mode pass (math
    attention: the fused kernels have no forward-mode rule); the derivatives in t, then lambda, by
    reverse mode.
    """
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    primals = {n: p.detach() for n, p in encoder.named_parameters() if p.requires_grad}
    target = patchify(images, encoder.patch_size)

    def losses_and_tokens(params):
        seen = {}

        def keep(tokens):
            seen["tokens"] = tokens
            return ids_keep

        pred = decoder(functional_call(encoder, params, (images, keep)), ids_restore)
        return per_patch_loss(pred, target, norm_pix_loss), seen["tokens"]

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), native_linear():
        (losses, tokens), (d_losses, d_tokens) = jvp(losses_and_tokens, (primals,), (dict(zip(names, v)),))
    t = torch.zeros((), dtype=torch.float32, device=images.device, requires_grad=True)
    probs = torch.sigmoid(masker(tokens + t * d_tokens if masker.on_tokens else images).float())
    rec = weighted_mae_loss(losses.float() + t * d_losses.float(), mask, probs, normalize_weights)
    (directional,) = torch.autograd.grad(rec, t, create_graph=True)
    return list(torch.autograd.grad(-unroll_lr * directional, trainable(masker)))


class PatchMLPMasking(nn.Module):
    """The official masking network (MLO-MAE's `MLOPatchMasking`): Linear(N x D, hidden) - ReLU -
    Linear(hidden, N) on the MAE's patch embeddings + positions (B, N, D) -> mask logits (B, N);
    torch's default initialisation, as there."""

    on_tokens = True  # its input is the encoder's patch tokens, not the image

    def __init__(self, num_patches: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(num_patches * dim, hidden)
        self.out = nn.Linear(hidden, num_patches)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(tokens.flatten(1))))

    def forward_flops(self) -> float:
        return 2.0 * (self.hidden.weight.numel() + self.out.weight.numel())


class MaskingNetwork(nn.Module):
    """A small ViT on the image with one logit per patch (not the paper's: `method.mask_net=vit`);
    sigmoid(logit) is the probability to mask it."""

    on_tokens = False

    def __init__(self, model: ModelConfig, dim: int, depth: int, heads: int):
        super().__init__()
        self.encoder = ViTEncoder(replace(model, embed_dim=dim, depth=depth, num_heads=heads, drop_path=0.0,
                                          pos_embed="sincos", grad_checkpointing=False))
        self.logit = nn.Linear(dim, 1)
        nn.init.normal_(self.logit.weight, std=0.02)  # near-uniform probabilities: starts close to random masking
        nn.init.zeros_(self.logit.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> mask logits (B, N)."""
        return self.logit(self.encoder(images)[:, 1:]).squeeze(-1)

    def forward_flops(self) -> float:
        return self.encoder.forward_flops(self.encoder.num_patches)


def split_shards(urls: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split of a shard list into (kept, held out), `fraction` of the shards (at least one) held out."""
    order = sorted(urls)
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * fraction))
    if held >= len(order):
        raise ValueError(f"method.downstream_train has {len(order)} shard(s): too few to hold out "
                         "method.val_fraction for level 3; write more shards or set method.downstream_val")
    return order[held:], order[:held]


class UpperLevels:
    """Levels 2 and 3, held outside the module tree so that DeepSpeed never casts, shards or steps them:
    the masking network, the head, their AdamW optimizers and fp32 replicas of the encoder and decoder."""

    def __init__(self, cfg: Config, encoder: ViTEncoder, decoder: MAEDecoder, num_classes: int):
        m, dim = cfg.method, cfg.model.embed_dim
        if m.mask_net == "mlp":
            self.masker = PatchMLPMasking(encoder.num_patches, dim, m.mask_net_hidden)
        else:
            self.masker = MaskingNetwork(cfg.model, m.mask_net_dim, m.mask_net_depth, m.mask_net_heads)
        self.head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Dropout(m.head_dropout), nn.Linear(dim, num_classes))
        self.encoder, self.decoder = EMA(encoder), EMA(decoder)  # replicas: `update(student, 0.0)` copies
        for replica, p in zip(self.encoder.module.parameters(), encoder.parameters()):
            replica.requires_grad_(p.requires_grad)  # the hypergradient differentiates the encoder replica
        self.mask_opt = torch.optim.AdamW(trainable(self.masker), weight_decay=m.mask_weight_decay, betas=(0.9, 0.95))
        self.head_opt = torch.optim.AdamW(trainable(self.head), weight_decay=m.head_weight_decay, betas=(0.9, 0.95))
        self.device = torch.device("cpu")

    def on(self, device: torch.device) -> "UpperLevels":
        """Move everything (optimizer states included) to `device` the first time it is needed there."""
        if device != self.device:
            for module in (self.masker, self.head):
                module.to(device)
            for opt in (self.mask_opt, self.head_opt):
                for state in opt.state.values():
                    for key, value in state.items():
                        if torch.is_tensor(value) and key != "step":
                            state[key] = value.to(device)
            self.encoder.on(device)
            self.decoder.on(device)
            self.device = device
        return self

    def state_dict(self) -> dict:
        return {"masker": self.masker.state_dict(), "head": self.head.state_dict(),
                "mask_opt": self.mask_opt.state_dict(), "head_opt": self.head_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Optimizer states land on their parameters' device, and `on` moves both together."""
        self.masker.load_state_dict(state["masker"])
        self.head.load_state_dict(state["head"])
        self.mask_opt.load_state_dict(state["mask_opt"])
        self.head_opt.load_state_dict(state["head_opt"])


def step_with(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor],
              lr: float) -> None:
    """One optimizer step on the rank-averaged `grads`."""
    for p, g in zip(params, all_reduce_mean(grads)):
        p.grad = g
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@register("mlo_mae")
class MLOMAE(Method):
    """Compression (train/compression.py): token dropout keeps `keep_ratio` of the visible patches of the
    level-1 masks (the dropped ones are reconstructed and weighted like the masked ones; the
    hypergradient uses the same compressed batch). No patch scaling (the masking network scores the
    model's grid)."""

    Config = MLOMAEConfig
    supported_compression = ("token_dropout",)

    def __init__(self, cfg: Config):
        super().__init__()
        m = self.cfg = cfg.method
        self.mean, self.std = cfg.data.mean, cfg.data.std
        labelled = resolve_shards(m.downstream_train or cfg.data.train, "method.downstream_train")
        if m.downstream_val:
            self.train_urls = labelled.urls
            self.val_urls = resolve_shards(m.downstream_val, "method.downstream_val").urls
        else:
            self.train_urls, self.val_urls = split_shards(labelled.urls, m.val_fraction, cfg.run.seed)
        num_classes = m.num_classes or len(labelled.classes or [])
        if num_classes < 2:
            raise ConfigError("method.num_classes: set it (>= 2); method.downstream_train has no manifest with classes")
        self.batch_size = cfg.data.batch_size
        self.downstream_batch = m.downstream_batch_size or cfg.data.batch_size
        self.head_lr = peak_lr(m.head_base_lr, global_batch(cfg))
        self.mask_lr = peak_lr(m.mask_base_lr, global_batch(cfg))

        self.encoder = ViTEncoder(cfg.model)
        self.num_keep = int(self.encoder.num_patches * (1 - m.mask_ratio))
        self.decoder = MAEDecoder(self.encoder.grid_size, cfg.model.embed_dim, m.decoder_dim, m.decoder_depth,
                                  m.decoder_heads, out_dim=cfg.model.patch_size**2 * 3)
        self.upper = UpperLevels(cfg, self.encoder, self.decoder, num_classes)
        self.level1 = None  # the last level-1 (images, ids_keep, ids_restore, mask): the hypergradient's batch
        log.info("mlo_mae: level 2 on %d labelled shards, level 3 on %d held-out shards, %d classes; head lr %.3g, "
                 "masking lr %.3g", len(self.train_urls), len(self.val_urls), num_classes, self.head_lr, self.mask_lr)

    # -- the engine's hooks -------------------------------------------------------------------------------
    @property
    def aux_every(self) -> int:
        return self.cfg.hyper_every

    def aux_streams(self) -> dict[str, tuple[list[str], int]]:
        return {"labelled": (self.train_urls, self.downstream_batch),
                "held_out": (self.val_urls, self.downstream_batch)}

    def autocast(self, device: torch.device):
        """bf16 autocast for the work outside DeepSpeed when DeepSpeed runs the model in bf16."""
        bf16 = self.encoder.vit.patch_embed.proj.weight.dtype == torch.bfloat16
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def sample(self, images: torch.Tensor, tokens: torch.Tensor, generator: torch.Generator | None = None):
        """Mask probabilities (B, N) and masks drawn from them: (probs, ids_keep, ids_restore, mask).

        The probabilities carry the gradient to `tokens` (the encoder's patch embeddings, the official
        masking network's input), never to the masking network's own parameters (level 3's).
        """
        masker = self.upper.on(images.device).masker
        frozen = {n: p.detach() for n, p in masker.named_parameters()}
        with self.autocast(images.device):
            logits = functional_call(masker, frozen, ((tokens if masker.on_tokens else images).float(),)).float()
        ids_keep, ids_restore, mask = sample_masks(logits, self.num_keep, self.cfg.mask_temperature, generator)
        return torch.sigmoid(logits), ids_keep, ids_restore, mask

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None, compression: Setting = FULL):
        """The encoder on the patches the masking network keeps (less those token dropout drops):
        (latent, probs, ids_keep, ids_restore, mask)."""
        drawn = []

        def keep(tokens):
            probs, *masks = self.sample(images, tokens, generator)
            drawn.extend((probs, *drop_visible(*masks, compression)))
            return drawn[1]

        return self.encoder(images, keep), *drawn

    def forward(self, batch: dict, step: int = 0):
        """Level 1: the MAE loss on the masking network's masks, weighted by the mask probabilities."""
        images = batch["images"]
        latent, probs, ids_keep, ids_restore, mask = self.encode(images, compression=batch.get("compression", FULL))
        pred = self.decoder(latent, ids_restore)
        per_patch = per_patch_loss(pred, patchify(images, self.encoder.patch_size), self.cfg.norm_pix_loss)
        loss = weighted_mae_loss(per_patch, mask, probs, self.cfg.normalize_mask_weights)
        self.level1 = (images, ids_keep, ids_restore, mask)
        probs = probs.detach()
        return loss, {"loss": loss.detach(), "rec_loss": weighted_mae_loss(per_patch.detach(), mask, 1.0),
                      "mask_prob": probs.mean(), "mask_prob_spread": probs.std(dim=1).mean()}

    def aux_step(self, batches: dict[str, dict], step: int, lr_scale: float) -> dict[str, torch.Tensor]:
        """Levels 2 and 3 after a level-1 step: one AdamW step of the head, then of the masking network."""
        m, (images, ids_keep, ids_restore, mask) = self.cfg, self.level1
        labelled, held_out = batches["labelled"], batches["held_out"]
        upper = self.upper.on(images.device)
        upper.encoder.update(self.encoder, 0.0)  # the replicas take the current (gathered) weights
        upper.decoder.update(self.decoder, 0.0)
        encoder, decoder, head = upper.encoder.module, upper.decoder.module, upper.head
        params = trainable(encoder)
        with self.autocast(images.device), native_linear():
            # level 2: the head's step; the features keep their graph when the head path is on
            with torch.set_grad_enabled(m.head_unroll_lr > 0):
                train_features = encoder(labelled["images"], pool="token").float()
            head_before = {n: p.detach().clone() for n, p in head.named_parameters()}
            head_loss = F.cross_entropy(head(train_features.detach()), labelled["labels"])
            step_with(upper.head_opt, list(head.parameters()),
                      torch.autograd.grad(head_loss, list(head.parameters())), self.head_lr * lr_scale)
            # level 3: the held-out loss through the encoder and the stepped head, then the hypergradient
            val_features = encoder(held_out["images"], pool="token").float()
            v, val_loss, val_acc = downstream_direction(params, head, head_before, train_features,
                                                        labelled["labels"], val_features, held_out["labels"],
                                                        m.head_unroll_lr)
            hypergrad = mask_hypergradient(encoder, decoder, upper.masker, images, ids_keep, ids_restore, mask, v,
                                           m.unroll_lr, m.norm_pix_loss, m.normalize_mask_weights)
        hypergrad = all_reduce_mean(hypergrad)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in hypergrad]))
        if self.mask_lr > 0:
            step_with(upper.mask_opt, trainable(upper.masker), hypergrad, self.mask_lr * lr_scale)
        return {"head_loss": head_loss.detach(), "val_loss": val_loss, "val_acc": val_acc, "hypergrad_norm": norm}

    def get_extra_state(self) -> dict:
        return self.upper.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.upper.load_state_dict(state)

    # -- monitoring --------------------------------------------------------------------------------------
    @torch.no_grad()
    def visualize(self, batch: dict, n: int = 8) -> dict[str, torch.Tensor]:
        """Rows of (original, mask-probability heat map, masked input, reconstruction), normalised units."""
        images = batch["images"][:n]
        # its own generator: drawing panels must not shift the training's random stream
        latent, probs, _, ids_restore, mask = self.encode(images, torch.Generator(images.device).manual_seed(0))
        pred = self.decoder(latent, ids_restore).float()
        p = self.encoder.patch_size
        target = patchify(images, p)
        if self.cfg.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        m = mask.unsqueeze(-1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        gray = (images.float() * std + mean).mean(dim=1, keepdim=True)
        grid = self.encoder.grid_size
        heat = F.interpolate(probs.view(-1, 1, *grid), size=images.shape[-2:], mode="nearest")
        colour = torch.cat([heat, torch.zeros_like(heat), 1 - heat], dim=1)  # red: likely masked, blue: kept
        heat_panel = ((0.5 * gray + 0.5 * colour) - mean) / std
        return {"mask_probability": torch.cat([images.float(), heat_panel, unpatchify(target * (1 - m), p),
                                               unpatchify(target * (1 - m) + pred * m, p)], dim=3)}

    def flops_per_image(self, compression: Setting = FULL) -> float:
        """Training FLOPs per level-1 image with levels 2 and 3 amortised over `hyper_every` steps (a backward
        counted as 2 forwards, the forward-mode pass as 2 forwards)."""
        m, n = self.cfg, self.encoder.num_patches
        masked = self.encoder.forward_flops(self.tokens_per_image(compression)) + self.decoder.forward_flops()
        full = self.encoder.forward_flops(n)
        masker = self.upper.masker.forward_flops()
        downstream = full * (3 if m.head_unroll_lr > 0 else 1) + 3 * full  # level 2, level 3 (per labelled image)
        hyper = 2 * masked + 3 * masker + downstream * self.downstream_batch / self.batch_size
        return 3 * masked + masker + hyper / m.hyper_every

    def tokens_per_image(self, compression: Setting = FULL) -> int:
        return compression.num_kept(self.num_keep)
