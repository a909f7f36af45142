"""EMA teachers that DeepSpeed never touches.

DeepSpeed casts the whole wrapped module to bf16 (an EMA with momentum 0.996-0.9999 in bf16 stops
moving: the update is below bf16's resolution), ZeRO-3 partitions every parameter of it, and it
would hand frozen teachers to the optimizer bookkeeping. So the teacher is an fp32 copy held
outside the module tree (a plain attribute, not a registered submodule). Its weights still travel
with checkpoints: the owning method returns `ema.state_dict()` from torch's `get_extra_state()`,
which DeepSpeed saves and restores with the module.
"""

import contextlib
import copy
import math

import torch
from torch import nn


def gathered(params: list[nn.Parameter]):
    """Full (read-only) tensors of ZeRO-3 partitioned parameters for the duration; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # heavy: only for ZeRO-3 partitioned parameters

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum rising from `base` at step 0 to 1 at `total_steps` on a half cosine (MoCo v3, DINO, BYOL)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_like(student: nn.Module, device: torch.device):
    """Run an fp32 teacher at the student's compute precision: bf16 autocast when DeepSpeed trains in bf16."""
    dtype = next(student.parameters()).dtype
    return torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))


class EMA:
    """An fp32 exponential moving average of `student` (same architecture), outside the module tree."""

    def __init__(self, student: nn.Module):
        self.module = copy.deepcopy(student).float().eval().requires_grad_(False)

    def on(self, device: torch.device) -> nn.Module:
        """The teacher module, moved to `device` the first time it is needed there."""
        if next(self.module.parameters()).device != device:
            self.module.to(device)
        return self.module

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, in fp32; buffers are copied."""
        params = list(student.parameters())
        with gathered(params):
            for t, s in zip(self.module.parameters(), params, strict=True):
                t.mul_(momentum).add_(s.detach().to(t.device, torch.float32), alpha=1 - momentum)
        for t, s in zip(self.module.buffers(), student.buffers(), strict=True):
            t.copy_(s)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
