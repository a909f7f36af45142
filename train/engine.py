"""The method-agnostic training loop on DeepSpeed.

The engine builds the method, its optimizer and the data stream, runs `method(batch, step)` ->
`(loss, report)` through `deepspeed.initialize`'s engine, and owns checkpoints, resume,
preemption and logging. It knows nothing about any particular method.
"""

import json
import logging
import math
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.augment import build_views
from data_pipeline.shards import build_digits_shards
from data_pipeline.stream import StreamLoader, mix_seed, resolve_shards
from train import checkpoint
from train.compression import CompressionSchedule, GradientDiagnostic, step_seed
from train.config import Config, ConfigError, resolve_path, save_config, to_dict
from train.distributed import WorldInfo, barrier, device_for, init_distributed
from train.methods import build_method
from train.monitor import Monitor, gpu_peak_flops
from train.optim import lr_at, make_optimizer, param_groups, set_lr, set_weight_decay, weight_decay_at
from train.speed import compile_blocks, enable_fast_kernels

log = logging.getLogger("train")


@dataclass
class RunResult:
    steps: int  # optimizer steps completed (cumulative over resumes)
    stopped_early: bool  # a preemption signal ended the run before the last step
    output_dir: Path
    last_checkpoint: str | None
    engine: object  # the DeepSpeed engine (its .module is the method)


ARCHITECTURE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pos_embed")


def architecture(cfg: Config) -> dict:
    """The model settings a checkpoint's weights depend on (drop path or checkpointing may change on resume)."""
    return {k: getattr(cfg.model, k) for k in ARCHITECTURE_KEYS}


def check_resume(cfg: Config, ckpt_dir: Path, tag: str, world_size: int) -> None:
    """Refuse, in one line and before any model is built, a checkpoint this run cannot continue."""
    meta = checkpoint.read_meta(ckpt_dir, tag)
    ours = {"model": architecture(cfg), "method": cfg.method.name}
    if meta.get("model") != ours["model"] or meta.get("method") != ours["method"]:
        raise ConfigError(f"run.resume: {ckpt_dir / tag} was written by method {meta.get('method')} with "
                          f"model {meta.get('model')}, not method {ours['method']} with model {ours['model']}")
    ranks = len(list((ckpt_dir / tag).glob("rank_*.pt")))
    if ranks and ranks != world_size:
        raise ConfigError(f"run.resume: {ckpt_dir / tag} was written by {ranks} ranks and this run has {world_size}; "
                          f"resume it with {ranks} ranks (the ZeRO optimizer state and the data positions are "
                          "split per rank), or set run.resume='' with a new run.output_dir to start afresh")


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The JSON from `train.deepspeed`, with batch sizes, precision and clipping filled in from our config."""
    path = resolve_path(cfg.train.deepspeed)
    ds = json.loads(path.read_text())
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: remove '{key}'; the optimizer and lr schedule come from optim.*")
    micro = cfg.data.batch_size
    total = cfg.train.global_batch_size or micro * world_size
    ds.update(
        train_batch_size=total,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=total // (micro * world_size),
        gradient_clipping=cfg.optim.clip_grad,
        bf16={"enabled": use_bf16(cfg)},
        steps_per_print=10**12,
    )
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def prepare_data(cfg: Config, world: WorldInfo) -> Config:
    """With no `data.train`, write the embedded digits shards (rank 0) and point train/val at them."""
    if cfg.data.train:
        return cfg
    shard_dir = cfg.output_dir / "shards"
    if world.is_main:
        build_digits_shards(shard_dir)
    barrier()
    cfg.data.train = str(shard_dir / "train.json")
    cfg.data.val = cfg.data.val or str(shard_dir / "val.json")
    return cfg


def steps_per_epoch_for(cfg: Config, num_samples: int | None) -> int | None:
    """Optimizer steps per pass over `data.train` (None when its sample count is unknown)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    batch = cfg.train.global_batch_size or cfg.data.batch_size * world
    return max(1, num_samples // batch) if num_samples else None


def total_steps_for(cfg: Config, num_samples: int | None) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) from epochs or steps."""
    steps_per_epoch = steps_per_epoch_for(cfg, num_samples)
    if cfg.train.steps:
        total = cfg.train.steps
    elif steps_per_epoch is None:
        raise ConfigError("train.epochs needs data.num_samples (or a manifest .json in data.train)")
    else:
        total = max(1, round(cfg.train.epochs * steps_per_epoch))
    warmup = cfg.optim.warmup_steps
    if cfg.optim.warmup_epochs:
        if steps_per_epoch is None:
            raise ConfigError("optim.warmup_epochs needs the sample count; use optim.warmup_steps")
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    return total, min(warmup, total)


def build_engine(cfg: Config, world_size: int):
    """The method, its optimizer and the DeepSpeed engine around them, as every run (and the benchmark) builds them.

    Returns (engine, optimizer, ds_config, peak_lr).
    """
    import deepspeed

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    if cfg.train.compile:
        compile_blocks(method, cfg.train.compile)
    ds_config = deepspeed_config(cfg, world_size)
    peak_lr = cfg.optim.base_lr * ds_config["train_batch_size"] / 256
    optimizer = make_optimizer(param_groups(method, cfg.optim.weight_decay, cfg.optim.layer_decay), peak_lr,
                               cfg.optim.betas, cpu_offload=offloads_optimizer(ds_config), name=cfg.optim.optimizer,
                               momentum=cfg.optim.momentum)
    engine, *_ = deepspeed.initialize(model=method, optimizer=optimizer, config=ds_config)
    return engine, optimizer, ds_config, peak_lr


class SkippedSteps:
    """Optimizer steps that left the weights unchanged count as failures, never as progress.

    DeepSpeed's ZeRO optimizers skip a step whose gradients overflow (inf/nan norm) and carry on with
    a finite loss, so a run could skip every step and still end "successfully". More than `limit` such
    steps in a row, or a run in which no step was applied, stop with one line naming the step and
    the last checkpoint written before the skipping began.
    """

    def __init__(self, limit: int, ckpt_dir: Path, good_tag: str | None):
        self.limit, self.ckpt_dir, self.good_tag = limit, ckpt_dir, good_tag
        self.in_row, self.applied, self.seen = 0, 0, 0

    def after_step(self, engine, step: int) -> None:
        norm = engine.get_global_grad_norm()  # a Python float when DeepSpeed found an overflow, else a tensor
        skipped = not engine.was_step_applied() or (isinstance(norm, float) and not math.isfinite(norm))
        self.seen += 1
        self.in_row = self.in_row + 1 if skipped else 0
        self.applied += not skipped
        if self.in_row > self.limit:
            raise FloatingPointError(self.message(f"{self.in_row} optimizer steps in a row up to step {step}"))

    def saved(self, tag: str) -> None:
        if self.in_row == 0:
            self.good_tag = tag

    def finish(self, step: int) -> None:
        if self.seen and not self.applied:
            raise FloatingPointError(self.message(f"every optimizer step of this run (to step {step})"))

    def message(self, which: str) -> str:
        return (f"DeepSpeed skipped {which}: the gradients overflowed or their norm is not finite; the last good "
                f"checkpoint is {self.good_tag} in {self.ckpt_dir}. Lower optim.base_lr, set optim.clip_grad, "
                "or check the data (train.max_skipped_steps sets how many in a row are tolerated)")


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm preemption / time limit); agreed on by all ranks every step."""

    def __init__(self):
        self.requested = False
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # a CPU (gloo) group so the per-step agreement never waits on the GPU stream
            self.group = dist.new_group(backend="gloo")
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing and exiting at the end of this step", signum)
        self.requested = True

    def agreed(self) -> bool:
        if self.group is None:
            return self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def restore(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


def train(cfg: Config, evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None) -> RunResult:
    """Run (or resume) pretraining as configured; every rank calls this.

    `evaluate(module, step)`, if given, runs on every rank after each checkpoint (not after a
    preemption stop); the scalars it returns go to TensorBoard and metrics.jsonl.
    """
    world = init_distributed()
    device = device_for(world)
    if device.type == "cuda":
        enable_fast_kernels()
    out = cfg.output_dir
    ckpt_dir = out / "checkpoints"
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    cfg = prepare_data(cfg, world)
    shards = resolve_shards(cfg.data.train)
    num_samples = cfg.data.num_samples or shards.num_samples
    total_steps, warmup_steps = total_steps_for(cfg, num_samples)

    resume = checkpoint.resolve_resume(cfg.run.resume, ckpt_dir)
    if resume:
        check_resume(cfg, *resume, world.world_size)
    engine, optimizer, ds_config, peak_lr = build_engine(cfg, world.world_size)
    method = engine.module
    global_batch = ds_config["train_batch_size"]
    accum = ds_config["gradient_accumulation_steps"]

    step = 0
    data_state, aux_state = None, {}
    if resume:
        resume_dir, tag = resume
        client_state, rank_state = checkpoint.load(engine, resume_dir, tag, world.rank)
        step = client_state["step"]
        if rank_state is not None:
            checkpoint.set_rng_state(rank_state["rng"])
            data_state = rank_state["data"]
            aux_state = rank_state.get("aux_data", {})
        log.info("resumed from %s at step %d", resume_dir / tag, step)
    else:
        torch.manual_seed(cfg.run.seed + world.rank)  # per-rank masking noise

    loader = StreamLoader(
        shards.urls, build_views(cfg.data, cfg.model.img_size, device), cfg.data.batch_size,
        rank=world.rank, world_size=world.world_size, seed=cfg.run.seed, resampled=cfg.data.resampled,
        shuffle_buffer=cfg.data.shuffle_buffer, workers=cfg.data.workers, pin_memory=device.type == "cuda",
        state=data_state, device=device, mean=cfg.data.mean, std=cfg.data.std)
    module = engine.module
    # streams a method reads besides the training batches (e.g. labelled splits for its aux_step)
    aux_loaders = {
        name: StreamLoader(
            urls, build_views(cfg.data, cfg.model.img_size, device), batch_size, rank=world.rank,
            world_size=world.world_size, seed=mix_seed(cfg.run.seed, zlib.crc32(name.encode())), resampled=True,
            shuffle_buffer=cfg.data.shuffle_buffer, workers=cfg.data.workers, pin_memory=device.type == "cuda",
            state=aux_state.get(name), device=device, mean=cfg.data.mean, std=cfg.data.std)
        for name, (urls, batch_size) in getattr(module, "aux_streams", dict)().items()}
    aux_every = getattr(module, "aux_every", 1)

    if world.is_main:
        save_config(cfg, out / "config.yaml")
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in method.parameters())  # ZeRO-3: full size
        log.info("method %s, %.1fM parameters, %d steps (%d warmup), global batch %d = %d per rank x %d ranks x %d "
                 "accumulation, precision %s, %s", cfg.method.name, n_params / 1e6, total_steps, warmup_steps,
                 global_batch, cfg.data.batch_size, world.world_size, accum,
                 "bf16" if use_bf16(cfg) else "fp32", Path(cfg.train.deepspeed).name)
        log.info("lr = base_lr %.3g x global batch %d / 256 = %.3g", cfg.optim.base_lr, global_batch, peak_lr)
    monitor = Monitor(out, world.is_main, total_steps, cfg.data.mean, cfg.data.std,
                      resume_step=step if resume else None)
    # compression: each micro-batch carries its step's Setting (a pure function of step / total_steps)
    compression = CompressionSchedule(cfg.compression, cfg.model.patch_size, total_steps)
    diagnostic = GradientDiagnostic(cfg, device, use_bf16(cfg)) if cfg.compression.diagnose_every else None
    if hasattr(module, "set_total_steps"):  # methods with schedules over training progress (steps or epochs)
        module.set_total_steps(total_steps, steps_per_epoch_for(cfg, num_samples))
    stop = StopFlag()
    skips = SkippedSteps(cfg.train.max_skipped_steps, ckpt_dir, resume[1] if resume else None)
    peak_flops = gpu_peak_flops()
    flops_per_image = getattr(module, "flops_per_image", lambda: None)()
    tokens_per_image = getattr(module, "tokens_per_image", lambda: None)()
    last_tag, stopped = None, False
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    wait, aux_time, t_log, steps_since = 0.0, 0.0, time.perf_counter(), 0
    batch = None
    data = iter(loader)
    aux_data = {name: iter(aux) for name, aux in aux_loaders.items()}
    try:
        while step < total_steps:
            lr = lr_at(step, peak_lr, total_steps, warmup_steps, cfg.optim.min_lr)
            set_lr(optimizer, lr)
            if cfg.optim.weight_decay_end >= 0:
                wd = weight_decay_at(step, total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
                set_weight_decay(optimizer, wd)
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(data)  # on the device, normalised
                wait += time.perf_counter() - t0
                if compression.active:
                    batch["compression"] = compression.at(step, step_seed(cfg.run.seed, world.rank, step, micro))
                loss, report = engine(batch, step)
                engine.backward(loss)
                engine.step()
                add_report(sums, counts, report)
            step += 1
            skips.after_step(engine, step)
            steps_since += 1
            if hasattr(module, "on_step_end"):
                module.on_step_end(step)
            if aux_data and step % aux_every == 0:
                t0 = time.perf_counter()
                aux_batches = {name: next(it) for name, it in aux_data.items()}  # on the device, normalised
                wait += time.perf_counter() - t0
                synchronize(device)  # time the aux step alone (a negligible stall once per step)
                t0 = time.perf_counter()
                add_report(sums, counts, module.aux_step(aux_batches, step, lr / peak_lr))
                synchronize(device)
                aux_time += time.perf_counter() - t0
            diagnosed = {}
            if diagnostic and step % cfg.compression.diagnose_every == 0 and not batch["compression"].is_full:
                # every rank takes part (gradients are averaged over ranks); not counted in img/s
                t0 = time.perf_counter()
                diagnosed = diagnostic(module, batch, step - 1, batch["compression"])
                t_log += time.perf_counter() - t0
            stopped = stop.agreed()
            save_now = stopped or step % cfg.run.ckpt_every == 0 or step == total_steps
            if save_now or step % cfg.run.log_every == 0:
                values = reduce_report(sums, counts)
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(
                        f"non-finite loss at step {step} ({values}); the last good checkpoint is {last_tag} in "
                        f"{ckpt_dir}. Lower optim.base_lr, set optim.clip_grad, or check the data.")
                elapsed = time.perf_counter() - t_log
                values["train/lr"] = lr
                if cfg.optim.weight_decay_end >= 0:
                    values["train/weight_decay"] = wd
                if compression.active:  # throughput counts the tokens and FLOPs of this step's setting
                    setting = batch["compression"]
                    values.update(compression.describe(setting))
                    flops_per_image = getattr(module, "flops_per_image", lambda **_: None)(compression=setting)
                    tokens_per_image = getattr(module, "tokens_per_image", lambda **_: None)(compression=setting)
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    values["train/grad_norm"] = float(grad_norm)
                img_s = steps_since * global_batch / elapsed
                values["perf/img_per_s"] = img_s
                if tokens_per_image:
                    values["perf/tokens_per_s"] = img_s * tokens_per_image
                if peak_flops and flops_per_image:
                    values["perf/mfu"] = img_s * flops_per_image / (peak_flops * world.world_size)
                if device.type == "cuda":
                    values["perf/max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                values["data/wait_fraction"] = wait / elapsed
                if aux_data:
                    values["perf/aux_fraction"] = aux_time / elapsed
                values["data/skipped"] = float(loader.skipped)
                values["data/samples_seen"] = float(loader.samples_seen)
                monitor.scalars(step, {**values, **diagnosed})
                sums, counts, wait, aux_time, t_log, steps_since = {}, {}, 0.0, 0.0, time.perf_counter(), 0
            elif diagnosed:
                monitor.scalars(step, diagnosed, console=False)
            if cfg.run.image_every and step % cfg.run.image_every == 0 and hasattr(module, "visualize"):
                monitor.images(step, module.visualize(batch))
            if save_now:
                meta = {"model": architecture(cfg), "method": cfg.method.name, "config": to_dict(cfg)}
                rank_state = {"rng": checkpoint.rng_state(), "data": loader.state_dict(),
                              "aux_data": {name: aux.state_dict() for name, aux in aux_loaders.items()}}
                last_tag = checkpoint.save(engine, ckpt_dir, step, meta, rank_state, world.rank, cfg.run.keep_last)
                skips.saved(last_tag)
                if evaluate is not None and not stopped:
                    monitor.scalars(step, evaluate(module, step), console=False)
                    t_log = time.perf_counter()  # evaluation time is not training throughput
            if stopped:
                log.warning("stopped by signal at step %d; checkpoint %s", step, last_tag)
                break
        skips.finish(step)
        if batch is not None and hasattr(module, "visualize") and monitor.last_image_step != step:
            monitor.images(step, module.visualize(batch))  # the final panel, unless the loop just wrote it
    finally:
        stop.restore()
        monitor.close()
    return RunResult(step, stopped, out, last_tag, engine)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_report(sums: dict[str, torch.Tensor], counts: dict[str, int], report: dict[str, torch.Tensor]) -> None:
    for key, value in report.items():
        sums[key] = sums.get(key, 0) + value.detach().float()
        counts[key] = counts.get(key, 0) + 1


def reduce_report(sums: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, float]:
    """Mean of each reported value over its reports since the last log and over ranks (one host sync)."""
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([sums[k] / counts[k] for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return {f"train/{k}": v for k, v in zip(keys, stacked.tolist())}
