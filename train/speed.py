"""What makes the step fast beyond bf16: TF32/cuDNN settings and regional torch.compile.

Regional compilation compiles each transformer block rather than the whole method: identical
blocks share one compiled graph (compile time of one block, not of the model), the method's own
Python (masking, schedules, teachers) stays eager, activation checkpointing wraps compiled blocks,
and DeepSpeed's hooks keep working (ZeRO-3's gathering hooks are `torch.compiler.disable`d, so they
run eagerly between the compiled pieces).
"""

import torch
from timm.models.vision_transformer import Block
from torch import nn


def enable_fast_kernels() -> None:
    """TF32 for the fp32 matmuls/convolutions left under bf16 (losses, EMA teachers); cuDNN autotuning."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest patch-embedding kernel once


def compile_blocks(module: nn.Module, backend: str) -> int:
    """`torch.compile` every timm transformer `Block` inside `module`, in place; returns how many."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
