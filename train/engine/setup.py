"""Everything a run sets up before its first step: process group, demo data, run length, the DeepSpeed engine
around the method it is handed, resume, data streams, monitor, compression schedule and the stop flag."""

import json
import logging
import math
import signal
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from data_pipeline.augment import build_views
from data_pipeline.shards import ensure_demo_shards
from data_pipeline.stream import StreamLoader, continues_exactly, mix_seed, resolve_shards
from train import checkpoint
from train.compression import CompressionSchedule, run_flops, steps_for_budget
from train.compression.diagnostic import GradientDiagnostic
from train.config import Config, ConfigError, resolve_path, save_config, to_dict
from train.distributed import WorldInfo, barrier, device_for, global_batch, init_distributed
from train.engine.guard import Anomaly
from train.eval.online import OnlineMonitor
from train.methods.base import Method
from train.monitor import Monitor
from train.optim import lr_at, make_optimizer, param_groups, set_frozen, set_lr, set_weight_decay, weight_decay_at
from train.optim import peak_lr as optim_peak_lr
from train.planning import GB, Estimate, ZeroSetting, estimate, footprint, human, plan
from train.speed import compile_blocks, enable_fast_kernels

log = logging.getLogger("train")


ARCHITECTURE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pos_embed")


def architecture(cfg: Config) -> dict:
    """The model settings a checkpoint's weights depend on (drop path or checkpointing may change on resume);
    `init_values` only when the blocks have LayerScale, so checkpoints without it read as before."""
    arch = {k: getattr(cfg.model, k) for k in ARCHITECTURE_KEYS}
    if cfg.model.init_values:
        arch["init_values"] = cfg.model.init_values
    return arch


def use_bf16(cfg: Config) -> bool:
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The JSON from `train.deepspeed` (checked by `load_config`), with batch sizes, precision and clipping filled
    in from our config."""
    ds = json.loads(resolve_path(cfg.train.deepspeed).read_text())
    micro, total = cfg.data.batch_size, global_batch(cfg, world_size)
    ds.update(
        train_batch_size=total,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=total // (micro * world_size),
        gradient_clipping=0.0 if cfg.optim.clip_per_param else cfg.optim.clip_grad,
        bf16={"enabled": use_bf16(cfg)},
        steps_per_print=10**12,
    )
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme")


def steps_per_epoch_for(cfg: Config, num_samples: int | None) -> int | None:
    """Optimizer steps per pass over `data.train` (None when its sample count is unknown)."""
    return max(1, num_samples // global_batch(cfg)) if num_samples else None


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


def build_engine(cfg: Config, build_method: Callable[[Config], Method], world_size: int, load_universal: bool = False):
    """The method (`build_method(cfg)`), its optimizer and the DeepSpeed engine around them, as every run (and
    the benchmark) builds them.

    `load_universal`: the engine will load a DeepSpeed universal checkpoint (another world size's).
    Returns (engine, optimizer, ds_config, peak_lr).
    """
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    method = build_method(cfg)
    if cfg.train.compile:
        compile_blocks(method, cfg.train.compile)
    ds_config = deepspeed_config(cfg, world_size)
    if load_universal:  # the checkpoint loads from its universal form (`needs_universal`)
        ds_config["checkpoint"] = {"load_universal": True}
    peak_lr = optim_peak_lr(cfg.optim.base_lr, ds_config["train_batch_size"])
    groups = param_groups(method, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.decay_all,
                          method.freezable)
    optimizer = make_optimizer(groups, peak_lr, cfg.optim.betas, cpu_offload=offloads_optimizer(ds_config),
                               name=cfg.optim.optimizer, momentum=cfg.optim.momentum)
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
            raise Anomaly(self.message(f"{self.in_row} optimizer steps in a row up to step {step}"), step, "skipped")

    def saved(self, tag: str) -> None:
        if self.in_row == 0:
            self.good_tag = tag

    def rolled_back(self) -> None:
        """The weights of `good_tag` are back: no step of the current run of skipped ones counts any more."""
        self.in_row = 0

    def finish(self, step: int) -> None:
        if self.seen and not self.applied:
            raise FloatingPointError(self.message(f"every optimizer step of this run (to step {step})"))

    def message(self, which: str) -> str:
        return (f"DeepSpeed skipped {which}: the gradients overflowed or their norm is not finite; the last good "
                f"checkpoint is {self.good_tag} in {self.ckpt_dir}. Lower optim.base_lr, set optim.clip_grad, "
                "or check the data (train.max_skipped_steps sets how many in a row are tolerated).")


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

def budget_steps(cfg: Config, method, steps: int, warmup: int, global_batch: int, log_it: bool) -> tuple[int, int]:
    """(total, warmup) steps of a run given as a compute budget (train.budget / train.budget_flops): the
    number of steps on the compression schedule whose training FLOPs equal the budget (FLOPs model)."""
    if method.flops_per_image() is None:
        raise ConfigError(f"train.budget: method {cfg.method.name} has no FLOPs model (flops_per_image)")
    patch = cfg.model.patch_size
    uncompressed = run_flops(method.flops_per_image, type(cfg.compression)(), patch, steps, global_batch)
    budget = cfg.train.budget_flops or cfg.train.budget * uncompressed
    total = steps_for_budget(method.flops_per_image, cfg.compression, patch, global_batch, budget)
    spent = run_flops(method.flops_per_image, cfg.compression, patch, total, global_batch)
    if log_it:
        log.info("compute budget %.4g FLOPs (%.3g x the uncompressed %d-step run's %.4g): %d steps on the compression "
                 "schedule = %.4g FLOPs", budget, budget / uncompressed, steps, uncompressed, total, spent)
    return total, min(warmup, total)


@dataclass
class Run:
    """A run ready for its first step (what `setup` built)."""

    cfg: Config
    world: WorldInfo
    device: torch.device
    engine: object  # the DeepSpeed engine; its .module is the method
    optimizer: torch.optim.Optimizer
    peak_lr: float
    total_steps: int
    warmup_steps: int
    global_batch: int
    accum: int  # micro-batches per optimizer step
    ds_config: dict  # the DeepSpeed config the engine was built with
    step: int  # optimizer steps completed (resumed runs: from the checkpoint)
    loader: StreamLoader
    aux_loaders: dict[str, StreamLoader]  # the method's own streams (aux_streams)
    monitor: Monitor
    compression: CompressionSchedule
    diagnostic: GradientDiagnostic | None
    online: OnlineMonitor | None  # eval.every: the fixed data.val subset the encoder is scored on
    stop: StopFlag
    resumed_from: str | None = None  # the checkpoint tag this run continues
    lr_scale: float = 1.0  # run.rollback_lr_scale ** rollbacks: multiplies the lr schedule
    rollbacks: int = 0  # run.on_anomaly=rollback: rollbacks so far (saved in checkpoints, so counted across resumes)

    def schedule(self, step: int) -> dict[str, float]:
        """Set the optimizer's lr (and weight decay when it follows a schedule) for `step`; the logged values."""
        o = self.cfg.optim
        values = {"train/lr": self.lr_scale * lr_at(step, self.peak_lr, self.total_steps, self.warmup_steps, o.min_lr)}
        set_lr(self.optimizer, values["train/lr"])
        if o.weight_decay_end >= 0:
            values["train/weight_decay"] = weight_decay_at(step, self.total_steps, o.weight_decay, o.weight_decay_end)
            set_weight_decay(self.optimizer, values["train/weight_decay"])
        set_frozen(self.optimizer, self.engine.module.frozen(step))  # parameters left out of this step
        return values

    def save(self, step: int) -> str:
        """A checkpoint of every rank at `step` (weights, optimizer, RNG, data positions, rollback state); its tag."""
        cfg = self.cfg
        meta = {"model": architecture(cfg), "method": cfg.method.name, "config": to_dict(cfg)}
        rank_state = {"rng": checkpoint.rng_state(), "data": self.loader.state_dict(),
                      "aux_data": {name: aux.state_dict() for name, aux in self.aux_loaders.items()},
                      "guard": {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}}
        return checkpoint.save(self.engine, cfg.output_dir / "checkpoints", step, meta, rank_state, self.world.rank,
                               cfg.run.keep_last)


def check_data(cfg: Config) -> None:
    """`data.train` and `data.val` exist and can be read: the manifest, every local shard, brace / glob patterns.

    Called by a run before anything is built, not by `validate`: recipes name data paths of the machine
    they are meant for and load anywhere."""
    for key in ("train", "val"):
        spec = getattr(cfg.data, key)
        if spec:
            try:
                resolve_shards(spec, f"data.{key}")
            except (OSError, ValueError) as err:
                raise ConfigError(str(err)) from None


def setup(cfg: Config, build_method: Callable[[Config], Method]) -> Run:
    """Process group, data, engine, resume, streams and monitor, in the order that keeps resume exact."""
    world = init_distributed()
    device = device_for(world)
    if device.type == "cuda":
        enable_fast_kernels()
    out = cfg.output_dir
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if ensure_demo_shards(cfg.data, out / "shards", world.is_main):
        barrier()  # rank 0 wrote them
    check_data(cfg)  # data.train / data.val readable: one ConfigError line, before the engine is built
    shards = resolve_shards(cfg.data.train)
    num_samples = cfg.data.num_samples or shards.num_samples
    total_steps, warmup_steps = total_steps_for(cfg, num_samples)
    found = checkpoint.resolve_resume(cfg.run.resume, out / "checkpoints")
    if found:
        check_resume(cfg, *found, world.world_size)  # before any model is built
    elastic = bool(found) and saved_ranks(found[0] / found[1]) not in (0, world.world_size)
    universal = bool(found) and needs_universal(found[0] / found[1], world.world_size)
    engine, optimizer, ds_config, peak_lr = build_engine(cfg, build_method, world.world_size, universal)
    step, data_state, aux_state, guard_state = resume(cfg, engine, world, found, shards.urls, elastic, universal)
    method = engine.module
    if cfg.train.budget or cfg.train.budget_flops:
        total_steps, warmup_steps = budget_steps(cfg, method, total_steps, warmup_steps,
                                                 ds_config["train_batch_size"], world.is_main)
    loader = stream_loader(cfg, world, device, shards.urls, cfg.data.batch_size, cfg.run.seed, cfg.data.resampled,
                           data_state)
    aux_loaders = {name: stream_loader(cfg, world, device, urls, batch_size, mix_seed(cfg.run.seed,
                                       zlib.crc32(name.encode())), True, aux_state.get(name))
                   for name, (urls, batch_size) in method.aux_streams().items()}
    if world.is_main:
        log_setup(cfg, method, total_steps, warmup_steps, ds_config, world.world_size, peak_lr)
        log.info("%s", expected_memory(cfg, build_method, ds_config, world.world_size))
    monitor = Monitor(out, world.is_main, total_steps, cfg.data.mean, cfg.data.std,
                      resume_step=step if found else None)
    # compression: each micro-batch carries its step's Setting (a pure function of step / total_steps)
    compression = CompressionSchedule(cfg.compression, cfg.model.patch_size, total_steps)
    diagnostic = (GradientDiagnostic(lambda: build_method(cfg), device, use_bf16(cfg), seed=cfg.run.seed)
                  if cfg.compression.diagnose_every else None)
    online = (OnlineMonitor(cfg.data.val, cfg.eval.monitor_samples, cfg.model.img_size, cfg.data.mean, cfg.data.std,
                            device, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                            world_size=world.world_size) if cfg.eval.every else None)
    method.set_total_steps(total_steps, steps_per_epoch_for(cfg, num_samples))
    return Run(cfg, world, device, engine, optimizer, peak_lr, total_steps, warmup_steps,
               ds_config["train_batch_size"], ds_config["gradient_accumulation_steps"], ds_config, step, loader,
               aux_loaders, monitor, compression, diagnostic, online, StopFlag(), found[1] if found else None,
               **guard_state)


def check_resume(cfg: Config, ckpt_dir: Path, tag: str, world_size: int) -> None:
    """Refuse, in one line and before any model is built, a checkpoint this run cannot continue."""
    meta = checkpoint.read_meta(ckpt_dir, tag)
    ours = {"model": architecture(cfg), "method": cfg.method.name}
    if meta.get("model") != ours["model"] or meta.get("method") != ours["method"]:
        raise ConfigError(f"run.resume: {ckpt_dir / tag} was written by method {meta.get('method')} with "
                          f"model {meta.get('model')}, not method {ours['method']} with model {ours['model']}")
    theirs, ours = checkpoint.saved_partitioning(ckpt_dir / tag), partitioning(cfg)
    if theirs != ours:
        name = {0: "ZeRO-0", 1: "ZeRO-1/2", 3: "ZeRO-3"}
        raise ConfigError(f"run.resume: {ckpt_dir / tag} was written with {name[theirs]} and this run uses "
                          f"{name[ours]} ({cfg.train.deepspeed}); their checkpoint files differ: resume with a "
                          f"{name[theirs]} config")
    ranks = saved_ranks(ckpt_dir / tag)
    if not ranks or ranks == world_size:
        return
    where = f"run.resume: {ckpt_dir / tag} was written by {ranks} ranks and this run has {world_size}"
    saved = meta.get("config", {})
    theirs = (saved.get("train", {}).get("global_batch_size")
              or saved.get("data", {}).get("batch_size", cfg.data.batch_size) * ranks)
    if global_batch(cfg, world_size) != theirs:
        raise ConfigError(f"{where} at global batch {theirs}, this run's is {global_batch(cfg, world_size)}; set "
                          f"train.global_batch_size={theirs} (with data.batch_size dividing {theirs} // {world_size}) "
                          "to resume elastically")


def partitioning(cfg: Config) -> int:
    """How this run's engine partitions the optimizer, as `checkpoint.saved_partitioning` names a checkpoint's."""
    stage = json.loads(resolve_path(cfg.train.deepspeed).read_text()).get("zero_optimization", {}).get("stage", 0)
    return {0: 0, 1: 1, 2: 1, 3: 3}[stage]


def needs_universal(tag_dir: Path, world_size: int) -> bool:
    """Whether checkpoint `tag_dir` loads through its universal form: a partitioned one written by another number
    of ranks (a ZeRO-0 one loads as it is on any world size)."""
    return checkpoint.saved_partitioning(tag_dir) != 0 and saved_ranks(tag_dir) not in (0, world_size)


def saved_ranks(tag_dir: Path) -> int:
    """The number of ranks that wrote checkpoint `tag_dir` (its per-rank state files; 0 when it has none)."""
    return len(list(tag_dir.glob("rank_*.pt")))


def resume(cfg: Config, engine, world: WorldInfo, found: tuple[Path, str] | None, urls: list[str],
           elastic: bool = False, universal: bool = False) -> tuple[int, dict | list[dict] | None, dict, dict]:
    """Load the checkpoint `found` (`run.resume` resolved and checked by `check_resume`), if any:
    (step, this rank's data position, its aux streams' positions, its rollback state: `Run.lr_scale` and
    `Run.rollbacks`). A fresh run seeds the per-rank RNG.

    `elastic`: the checkpoint has another world size; `universal`: weights, optimizer state and step load from
    DeepSpeed's universal form of it (`needs_universal`: partitioned by ZeRO). A data stream that does not
    continue exactly (another world size or data.workers, or another shard list in epoch mode) gets every old
    rank's stream state (`data_pipeline.stream.continue_layout`)."""
    if not found:
        torch.manual_seed(cfg.run.seed + world.rank)  # per-rank masking noise
        return 0, None, {}, {}
    resume_dir, tag = found
    client_state, rank_state = checkpoint.load(engine, resume_dir, tag, world.rank, universal=universal)
    data_state, aux_state, guard_state, old = None, {}, {}, None
    if elastic:
        torch.manual_seed(mix_seed(cfg.run.seed, world.rank, client_state["step"]))  # fresh per-rank noise
        log.info("elastic resume: %s was written by %d ranks, this run has %d; %s", resume_dir / tag,
                 saved_ranks(resume_dir / tag), world.world_size, "loaded its DeepSpeed universal checkpoint "
                 "(weights, optimizer state)" if universal else "ZeRO-0: loaded as it is")
        old = checkpoint.rank_states(resume_dir / tag)
        rank_state = old[0]  # its rollback count and lr scale are every rank's
    elif rank_state is not None:
        checkpoint.set_rng_state(rank_state["rng"])
    if rank_state is not None:
        data_state = rank_state["data"]
        aux_state = rank_state.get("aux_data", {})
        guard_state = rank_state.get("guard", {})

        def exact(state: dict, shards: list[str], resampled: bool) -> bool:
            return not elastic and continues_exactly(state, shards, world.world_size, cfg.data.workers, resampled)

        if not exact(data_state, urls, cfg.data.resampled):
            old = old or checkpoint.rank_states(resume_dir / tag)
            data_state = [s["data"] for s in old]
        for name, state in aux_state.items():
            if not exact(state, [], True):  # aux streams are resampled: their shard list does not matter
                old = old or checkpoint.rank_states(resume_dir / tag)
                aux_state[name] = [s["aux_data"][name] for s in old]
    log.info("resumed from %s at step %d", resume_dir / tag, client_state["step"])
    return client_state["step"], data_state, aux_state, guard_state


def stream_loader(cfg: Config, world: WorldInfo, device: torch.device, urls: list[str], batch_size: int, seed: int,
                  resampled: bool, state: dict | list[dict] | None) -> StreamLoader:
    """A training stream of this rank: the run's views, on the device and normalised, resumed from `state`."""
    d = cfg.data
    return StreamLoader(urls, build_views(d, cfg.model.img_size, device), batch_size, rank=world.rank,
                        world_size=world.world_size, seed=seed, resampled=resampled, shuffle_buffer=d.shuffle_buffer,
                        workers=d.workers, pin_memory=device.type == "cuda", state=state, device=device, mean=d.mean,
                        std=d.std)


def log_setup(cfg: Config, method, total_steps: int, warmup_steps: int, ds_config: dict, world_size: int,
              peak_lr: float) -> None:
    """Rank 0: the resolved config into the run directory, the run's shape and the lr rule to the log."""
    save_config(cfg, cfg.output_dir / "config.yaml")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in method.parameters())  # ZeRO-3: full size
    batch = ds_config["train_batch_size"]
    log.info("method %s, %.1fM parameters, %d steps (%d warmup), global batch %d = %d per rank x %d ranks x %d "
             "accumulation, precision %s, %s", cfg.method.name, n_params / 1e6, total_steps, warmup_steps,
             batch, cfg.data.batch_size, world_size, ds_config["gradient_accumulation_steps"],
             "bf16" if use_bf16(cfg) else "fp32", Path(cfg.train.deepspeed).name)
    log.info("lr = base_lr %.3g x global batch %d / 256 = %.3g", cfg.optim.base_lr, batch, peak_lr)


class OutOfMemory(RuntimeError):
    """The run did not fit in GPU memory; the message names the planner's suggestion."""


def planned(cfg: Config, build_method: Callable[[Config], Method], ds_config: dict, world_size: int) -> Estimate:
    """The planner's estimate (`train.planning`) for this run's own setting."""
    zero = ds_config.get("zero_optimization", {})
    setting = ZeroSetting(zero.get("stage", 0) or 1, offloads_optimizer(ds_config), cfg.model.grad_checkpointing)
    grad_fp32 = ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32"
    return estimate(footprint(cfg, build_method), setting, world_size, ds_config["train_batch_size"],
                    cfg.data.batch_size, grad_fp32=grad_fp32)


def expected_memory(cfg: Config, build_method: Callable[[Config], Method], ds_config: dict, world_size: int) -> str:
    """One log line: the planner's per-GPU memory for this setting (never fails the run)."""
    try:
        e = planned(cfg, build_method, ds_config, world_size)
    except Exception as err:  # the estimate is advice: a method the meta device cannot trace still trains
        return f"plan: no estimate ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    return (f"plan: expected {human(e.total)} per GPU ({human(e.states)} model states, {human(e.extras)} outside "
            f"DeepSpeed, {human(e.activations)} activations at micro-batch {e.micro_batch}); "
            "`python -m train.plan --config ...` compares the settings")


def out_of_memory_message(cfg: Config, build_method: Callable[[Config], Method], ds_config: dict,
                          world_size: int, step: int) -> str:
    """One line for an out-of-memory error: where, what was expected, and the planner's suggestion."""
    device = torch.cuda.get_device_properties(0).total_memory / GB if torch.cuda.is_available() else 80.0
    setting = f"{Path(cfg.train.deepspeed).name}, micro-batch {cfg.data.batch_size}"
    try:
        expected = f"; planned {human(planned(cfg, build_method, ds_config, world_size).total)}"
        _, best = plan(footprint(cfg, build_method), world_size, ds_config["train_batch_size"], device)
    except Exception:  # the message must come out whatever the planner makes of this method
        expected, best = "", None
    advice = ("the planner finds no setting that fits" if best is None else
              f"the planner suggests {best.setting.name} at micro-batch {best.micro_batch}: train.deepspeed="
              f"{best.setting.deepspeed} data.batch_size={best.micro_batch}"
              + (" model.grad_checkpointing=true" if best.setting.checkpointing else ""))
    return (f"out of GPU memory at step {step} ({setting}{expected} of {device:.0f} GB); {advice} "
            f"(python -m train.plan --config <recipe> --gpus {world_size} --gpu-memory {device:.0f})")
