"""Parameter groups and the learning-rate schedule (a pure function of the step)."""

import math

import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that submodules exclude via timm's `no_weight_decay()` convention."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position embeddings and special tokens; frozen params left out.

    With `layer_decay` < 1, timm's layer-wise groups (BEiT/MAE fine-tuning) over the layers that
    `model.group_matcher()` names: each group's `lr_scale` is decay^(last layer - layer).
    """
    no_decay = no_weight_decay_names(model)
    if layer_decay < 1.0:
        return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)


def peak_lr(base_lr: float, global_batch: int) -> float:
    """MAE's rule: lr = base_lr x global batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak_lr`, then half-cosine decay to `min_lr` at `total_steps` (per step, as MAE)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, scaled by its `lr_scale` (layer-wise decay) where it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], cpu_offload: bool,
                   name: str = "adamw", momentum: float = 0.9):
    """torch AdamW (fused on GPU); DeepSpeed's CPU Adam when ZeRO offloads the optimizer to the host.

    `name="sgd"`: SGD with momentum; `"lars"`: timm's LARS as MAE's linear probe uses it (trust ratio
    on weight matrices only, not on biases or norms).
    """
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        for group in groups:
            group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
        return Lars(groups, lr=lr, momentum=momentum)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # heavy: only with optimizer offload

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (DINO's weight decay: 0.04 -> 0.4)."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of the groups built with one (norms, biases and embeddings stay at 0)."""
    for group in optimizer.param_groups:
        if group.setdefault("decayed", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay
