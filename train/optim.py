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


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0, decay_all: bool = False,
                 freezable: tuple[str, ...] = ()) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position embeddings and special tokens; frozen params left out.

    With `layer_decay` < 1, timm's layer-wise groups (BEiT/MAE fine-tuning) over the layers that
    `model.group_matcher()` names: each group's `lr_scale` is decay^(last layer - layer).
    `decay_all`: one group, `weight_decay` on every trainable parameter (MoCo v3's
    `AdamW(model.parameters(), weight_decay=0.1)`). Parameters whose names start with one of the
    `freezable` prefixes get groups of their own, tagged `freezable: prefix`, for `set_frozen`.
    """
    if decay_all:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    elif layer_decay < 1.0:
        no_decay = no_weight_decay_names(model)
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay_names(model))
    names = {id(p): n for n, p in model.named_parameters()}
    for prefix in freezable:
        split = []
        for group in groups:
            inside = [p for p in group["params"] if names[id(p)].startswith(prefix)]
            group["params"] = [p for p in group["params"] if not names[id(p)].startswith(prefix)]
            split += [group] if group["params"] else []
            split += [{**group, "params": inside, "freezable": prefix}] if inside else []
        groups = split
    return groups


class SkipsFrozenGroups:
    """Optimizer mixin: `step` leaves out the groups flagged `frozen` (see `set_frozen`), as if their
    gradients were None (DINO's `cancel_gradients_last_layer`): no update, no weight decay, and their
    state is neither created nor advanced, so they start with fresh moments and step count once unfrozen.
    Works under every ZeRO stage: DeepSpeed steps the wrapped optimizer on its flat partitions of our groups."""

    def step(self, *args, **kwargs):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("frozen")]
        try:
            return super().step(*args, **kwargs)
        finally:
            self.param_groups = groups


class AdamW(SkipsFrozenGroups, torch.optim.AdamW):
    pass


def set_frozen(optimizer: torch.optim.Optimizer, frozen: tuple[str, ...]) -> None:
    """Flag the groups built for the `freezable` prefixes in `frozen` (the others are unflagged)."""
    for group in optimizer.param_groups:
        group["frozen"] = group.get("freezable") in frozen


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
    """torch AdamW (fused on GPU); DeepSpeed's CPU Adam when ZeRO offloads the optimizer to the host;
    both skip the groups flagged `frozen`.

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

        class CPUAdamW(SkipsFrozenGroups, DeepSpeedCPUAdam):
            pass

        return CPUAdamW(groups, lr=lr, betas=betas, adamw_mode=True)
    return AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def weight_decay_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (DINO's weight decay: 0.04 -> 0.4)."""
    progress = min(1.0, step / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Set the weight decay of the groups built with one (norms, biases and embeddings stay at 0)."""
    for group in optimizer.param_groups:
        if group.setdefault("decayed", group["weight_decay"] > 0):
            group["weight_decay"] = weight_decay


def clipped(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """`grad` x max_norm / (|grad| + 1e-6) where that factor is below 1, else `grad` (DINO's `clip_gradients`)."""
    return grad * (max_norm / (grad.float().norm() + 1e-6)).clamp(max=1.0).to(grad.dtype)


def clip_per_parameter(model: nn.Module, max_norm: float) -> None:
    """Clip each trainable parameter's gradient to norm `max_norm` (DINO), after backward and before the step.

    It acts on the gradient the optimizer will use, averaged over ranks, under every ZeRO stage
    (DeepSpeed's `safe_update_full_grad_vectorized`: with ZeRO-1/2/3 each parameter's gradient is
    reassembled from its partitions, clipped, and written back to this rank's partition), at the cost of
    one extra all-reduce (ZeRO-1/2) or all-gather (ZeRO-3) of the gradient per step.
    """
    from deepspeed.utils import safe_update_full_grad_vectorized

    safe_update_full_grad_vectorized([p for p in model.parameters() if p.requires_grad],
                                     lambda grad, _: clipped(grad, max_norm))
