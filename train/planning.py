"""Per-GPU memory, communication and step-time model of a run, for every ZeRO setting (`python -m train.plan`).

The method is built on the meta device (no memory, no weights; a ViT-g plans on a laptop) and one
forward is traced there: the tensors autograd saves for the backward are the activations, counted
exactly for the method's own graph (masking, decoders, heads, multi-crop). Model states follow
DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`); ZeRO-1, which DeepSpeed has no estimator for, follows the
same accounting. Assumptions, stated once:
- bf16 training: activations are the traced fp32 bytes halved (autocast keeps matmul outputs in bf16;
  the norms' fp32 inputs make this a slight underestimate), attention as fused SDPA keeps q, k, v, the
  output and the log-sum-exp (flash / memory-efficient kernels), not the (s x s) probabilities.
- Models held outside DeepSpeed are whole on every GPU: EMA teachers and replicas fp32, frozen teachers
  bf16, auxiliary trainable levels fp32 with AdamW states.
- Activation checkpointing (`model.grad_checkpointing`: timm's, per encoder block) keeps each block's
  input and recomputes its forward once in the backward (4/3 of the FLOPs); the peak adds one block's
  activations to the stored inputs.
- Step time = compute at `mfu` of the peak + the communication the backward cannot hide (a fraction
  `overlap` of the backward time hides it), ring collectives at `bandwidth` GB/s per GPU.
"""

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import batch_shapes
from train.config import Config
from train.models.ema import EMA

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    """What a method costs per GPU apart from its ZeRO-partitioned states, measured on the meta device."""

    trainable: int  # parameters DeepSpeed optimizes
    frozen: int  # parameters in the module tree without gradients (held by DeepSpeed in 16 bit)
    largest_layer: int  # the largest module's own parameters (ZeRO-3 gathers one at a time)
    outside: float  # bytes of the models held outside DeepSpeed (EMA teachers, frozen teachers, aux levels)
    activations: float  # bytes saved for the backward per image, bf16
    activations_ckpt: float  # the same with activation checkpointing, peak of the backward included
    flops: float  # training FLOPs per image (the method's own model)


@dataclass(frozen=True)
class ZeroSetting:
    """One way to run: a ZeRO stage (optionally with the optimizer offloaded) and activation checkpointing."""

    stage: int
    offload: bool
    checkpointing: bool

    @property
    def name(self) -> str:
        zero = f"zero{self.stage}" + ("_offload" if self.offload else "")
        return zero + (" + ckpt" if self.checkpointing else "")

    @property
    def deepspeed(self) -> str:
        return f"ds_configs/zero{self.stage}" + ("_offload" if self.offload else "") + ".json"


SETTINGS = tuple(ZeroSetting(stage, offload, ckpt) for ckpt in (False, True)
                 for stage, offload in ((1, False), (2, False), (3, False), (3, True)))


@dataclass(frozen=True)
class Estimate:
    setting: ZeroSetting
    micro_batch: int
    accumulation: int
    states: float  # bytes of parameters + gradients + optimizer states per GPU
    extras: float  # EMA / frozen teachers
    activations: float
    comm: float  # bytes each GPU sends per optimizer step
    step_time: float  # seconds per optimizer step (model above)

    @property
    def total(self) -> float:
        return self.states + self.extras + self.activations


def model_states(trainable: int, frozen: int, largest_layer: int, stage: int, offload: bool, gpus: int,
                 grad_fp32: bool) -> float:
    """Bytes per GPU of 16-bit weights, gradients, fp32 master weights and AdamW moments (DeepSpeed's accounting).

    `grad_fp32`: gradients accumulated in fp32 (`data_types.grad_accum_dtype`), 2 more bytes a parameter.
    Frozen parameters cost their 16-bit weights only (partitioned under ZeRO-3).
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # heavy import
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    extra_grad = 2 * trainable if grad_fp32 else 0
    if stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(trainable, largest_layer, gpus, 1, cpu_offload=offload,
                                                          cpu_offload_params=False)
        return gpu + extra_grad / gpus + 2 * frozen / gpus
    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus, 1, cpu_offload=offload)
        return gpu + extra_grad / gpus + 2 * frozen
    # ZeRO-1: 16-bit weights and gradients whole (4), fp32 gradient partition + master + moments partitioned (16)
    return 4 * trainable + 16 * trainable / gpus + extra_grad + 2 * frozen


def comm_bytes(trainable: int, stage: int, gpus: int, accumulation: int, grad_bytes: int) -> float:
    """Bytes each GPU sends per optimizer step in ring collectives ((n - 1) / n of each tensor per pass).

    ZeRO-1: one reduce-scatter of the gradients at the step and one all-gather of the updated weights;
    ZeRO-2: the reduce-scatter every micro-batch; ZeRO-3: also two weight all-gathers (forward, backward)
    every micro-batch.
    """
    if gpus == 1:
        return 0.0
    ring = (gpus - 1) / gpus
    grads = trainable * grad_bytes * ring
    weights = trainable * 2 * ring
    if stage == 1:
        return grads + weights
    if stage == 2:
        return accumulation * grads + weights
    return accumulation * (grads + 2 * weights)


def _float_bytes(t: torch.Tensor) -> int:
    return t.numel() * (2 if t.is_floating_point() else t.element_size())


@contextlib.contextmanager
def saved_tensor_counter(params: set[int], count):
    """Call `count(nbytes)` for every tensor autograd saves (bf16 for floats), parameters and repeats excluded.

    Attention runs through `F.scaled_dot_product_attention`; on the meta device it decomposes into the
    math path, which saves the (s x s) probabilities that fused kernels never store, so inside it
    nothing is counted and the fused kernels' own saved tensors (q, k, v, out, fp32 log-sum-exp) are.
    """
    seen: set[int] = set()
    inside = [False]

    def pack(t):
        base = t._base if t._base is not None else t
        if not inside[0] and id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            count(_float_bytes(base))
        return t

    sdpa = F.scaled_dot_product_attention

    def fused_sdpa(q, k, v, *args, **kwargs):
        inside[0] = True
        try:
            o = sdpa(q, k, v, *args, **kwargs)
        finally:
            inside[0] = False
        if o.dim() == 4:  # the fused kernels' layout, (B, N, H, D) in memory: the usual transpose back is a view
            o = o.transpose(1, 2).contiguous().transpose(1, 2)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            seen.add(id(o._base if o._base is not None else o))
            count(sum(map(_float_bytes, (q, k, v, o))) + 4 * q.shape[:-1].numel())
        return o

    autocast = torch.autocast

    def meta_autocast(device_type, *args, **kwargs):  # torch has no autocast for the meta device
        return contextlib.nullcontext() if device_type == "meta" else autocast(device_type, *args, **kwargs)

    F.scaled_dot_product_attention, torch.autocast = fused_sdpa, meta_autocast
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        F.scaled_dot_product_attention, torch.autocast = sdpa, autocast


def meta_batch(cfg: Config, batch: int) -> dict:
    """A batch of the method's views (DESIGN.md's batch contract), shapes only."""
    out = {"labels": torch.zeros(batch, dtype=torch.long, device="meta")}
    for key, shape in batch_shapes(cfg.data, cfg.model.img_size, batch).items():
        out[key] = torch.zeros(shape, device="meta")
    return out


def outside_bytes(holder: object, depth: int = 3) -> float:
    """Bytes per GPU of the models a method holds outside DeepSpeed, in plain attributes (nested up to `depth`).

    `EMA` teachers and replicas: fp32 weights. Trainable modules (auxiliary levels with their own AdamW):
    fp32 weights, gradients and two moments. Frozen modules (CLIP teachers): bf16 weights.
    """
    total = 0.0
    for value in vars(holder).values():
        if isinstance(value, EMA):
            total += 4 * sum(p.numel() for p in value.module.parameters())
        elif isinstance(value, nn.Module):
            total += sum((16 if p.requires_grad else 2) * p.numel() for p in value.parameters())
        elif depth > 1 and type(value).__module__.startswith("train.") and hasattr(value, "__dict__"):
            total += outside_bytes(value, depth - 1)  # holders: FrozenTeacher, KCLIPTokenizer, MLO-MAE's levels
    return total


def traced_activations(method: nn.Module, cfg: Config, batch: int = 2) -> tuple[float, float]:
    """Bytes saved for the backward per image (bf16), without and with activation checkpointing of the encoder.

    One forward of `batch` images; what the encoder's blocks save is counted per block, so checkpointing
    (timm's: each block keeps its input and is recomputed in the backward) is the total less the blocks'
    own tensors, plus their inputs, plus the largest block's tensors (the peak while one is recomputed).
    """
    blocks = list(method.encoder.vit.blocks)
    total, per_block, inputs, current = [0.0], [0.0] * len(blocks), [0.0], [None]

    def count(nbytes):
        total[0] += nbytes
        if current[0] is not None:
            per_block[current[0]] += nbytes

    def enter(i):
        def hook(_, args):
            current[0] = i
            if torch.is_grad_enabled():
                inputs[0] += _float_bytes(args[0])
        return hook

    def leave(*_):
        current[0] = None

    handles = [h for i, blk in enumerate(blocks)
               for h in (blk.register_forward_pre_hook(enter(i)), blk.register_forward_hook(leave))]
    try:
        with saved_tensor_counter({id(p) for p in method.parameters()}, count):
            method.train()
            method(meta_batch(cfg, batch), 0)
    finally:
        for h in handles:
            h.remove()
    checkpointed = total[0] - sum(per_block) + inputs[0] + max(per_block, default=0.0)
    return total[0] / batch, checkpointed / batch


def footprint(cfg: Config, build_method, total_steps: int = 1000) -> Footprint:
    """Build the method on the meta device and measure it (`build_method(cfg)` -> the method)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.grad_checkpointing = False  # traced eagerly; checkpointing is modelled from the per-block counts
    with torch.device("meta"):
        method = build_method(cfg)
    method.set_total_steps(total_steps, None)
    act, act_ckpt = traced_activations(method, cfg)
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in method.modules())
    flops = method.flops_per_image() or 6 * trainable * method.tokens_per_image()
    return Footprint(trainable, frozen, largest, outside_bytes(method), act, act_ckpt, flops)


def micro_batches(per_gpu: int) -> list[int]:
    """Micro-batches that divide a GPU's share of the global batch, largest first."""
    return [b for b in range(per_gpu, 0, -1) if per_gpu % b == 0]


def estimate(fp: Footprint, setting: ZeroSetting, gpus: int, global_batch: int, micro_batch: int, *,
             grad_fp32: bool = True, peak_flops: float = 790e12, mfu: float = 0.45, bandwidth: float = 25.0,
             overlap: float = 0.5) -> Estimate:
    """Memory per GPU and modelled step time of one setting at one micro-batch."""
    accumulation = global_batch // (gpus * micro_batch)
    states = model_states(fp.trainable, fp.frozen, fp.largest_layer, setting.stage, setting.offload, gpus, grad_fp32)
    extras = fp.outside
    acts = micro_batch * (fp.activations_ckpt if setting.checkpointing else fp.activations)
    comm = comm_bytes(fp.trainable, setting.stage, gpus, accumulation, 4 if grad_fp32 else 2)
    compute = global_batch / gpus * fp.flops * (4 / 3 if setting.checkpointing else 1) / (peak_flops * mfu)
    backward = compute * 2 / 3
    exposed = max(0.0, comm / (bandwidth * GB) - overlap * backward)
    if setting.offload:  # the optimizer step on the CPU: ~16 bytes a parameter each way over PCIe (~25 GB/s)
        exposed += 16 * fp.trainable / gpus / (25 * GB)
    return Estimate(setting, micro_batch, accumulation, states, extras, acts, comm, compute + exposed)


def plan(fp: Footprint, gpus: int, global_batch: int, gpu_memory: float, reserve: float = 3.0,
         **model) -> tuple[list[Estimate], Estimate | None]:
    """Every setting at the largest micro-batch that fits (or the smallest, marked not fitting), and the fastest fit.

    `gpu_memory` / `reserve` in GB: the reserve covers the CUDA context, allocator fragmentation and
    communication buffers.
    """
    if global_batch % gpus:
        raise ValueError(f"global batch {global_batch} is not a multiple of {gpus} GPUs")
    budget = (gpu_memory - reserve) * GB
    rows = []
    for setting in SETTINGS:
        candidates = [estimate(fp, setting, gpus, global_batch, b, **model)
                      for b in micro_batches(global_batch // gpus)]
        fits = [e for e in candidates if e.total <= budget]
        rows.append(fits[0] if fits else candidates[-1])
    fitting = [e for e in rows if e.total <= budget]
    # ties (within 2%, e.g. on one GPU where nothing is communicated) go to the simpler setting: ZeRO-3's
    # gathering hooks and offload cost time the model does not see; then to the larger micro-batch
    best = min(fitting, key=lambda e: (round(math.log(e.step_time) / math.log(1.02)), e.setting.stage,
                                        e.setting.offload, e.setting.checkpointing, -e.micro_batch), default=None)
    return rows, best


def human(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.05 * GB else f"{nbytes / 1e6:.0f} MB"


def parameters(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n else "0"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0

