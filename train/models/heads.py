"""Heads of the augmentation-invariance methods: MoCo v3 / SimCLR projection MLPs and DINO's head."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class FP32BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm computed in fp32, whatever the dtype of its weights and input, and returned in the input's.

    DeepSpeed's bf16 casts parameters but not buffers, so a plain BatchNorm would see bf16 weights beside
    fp32 running statistics (a dtype error); and the official AMP runs normalise in fp32 anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(x.float(), self.running_mean, self.running_var, weight, bias, use_batch, self.momentum,
                            self.eps).to(x.dtype)


def projection_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: (Linear without bias, BatchNorm, ReLU) per hidden layer, then a Linear without bias and,
    when `last_bn`, a BatchNorm without affine parameters (SimCLR's design, simplified by MoCo v3)."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [FP32BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(FP32BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm over the global batch (torch SyncBatchNorm) when several GPU ranks train, as MoCo v3 and
    SimCLR do; torch has no SyncBatchNorm on CPU, where each rank normalises its own batch."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def linear_flops(module: nn.Module) -> float:
    """Forward FLOPs per sample of the Linear layers of `module` (2 per multiply-add; full sizes under ZeRO-3)."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)]
    return float(sum(2 * getattr(w, "ds_numel", w.numel()) for w in weights))


class WeightNormLinear(nn.Module):
    """A bias-free Linear with weight = g * v / ||v|| per output unit (torch's weight_norm, dim 0, and its
    parameter names `weight_g` / `weight_v`), written out so that ZeRO-3 gathers g and v in this forward.
    Computed in fp32: DINO sharpens these (65536-way) logits with temperatures down to 0.04."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        v, g = self.weight_v, self.weight_g
        if frozen:  # no gradient reaches this layer; the layers below still learn
            v, g = v.detach(), g.detach()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), g.float() * F.normalize(v.float(), dim=1))


class DINOHead(nn.Module):
    """DINO's head: MLP (GELU) to a bottleneck, L2 normalisation, weight-normalised Linear to `out_dim`."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1)
        return self.last_layer(x, frozen=freeze_last_layer)


PROBE_BN_EPS = 1e-6  # MAE's linear-probe BatchNorm


def probe_head(dim: int, num_classes: int, std: float = 0.01, generator: torch.Generator | None = None) -> nn.Module:
    """MAE's linear-probe head: BatchNorm without affine, then a Linear with trunc-normal weights."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=PROBE_BN_EPS), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=std, generator=generator)
    nn.init.zeros_(head[1].bias)
    return head
