"""The method-agnostic training loop on DeepSpeed.

`train(cfg, build_method)` builds the method it is handed, its optimizer and the data stream
(`setup.py`), runs `method(batch, step)` -> `(loss, report)` through `deepspeed.initialize`'s
engine, and owns checkpoints, resume, preemption and logging (`meter.py`). It calls the method only
through the hooks of `train.methods.base.Method` and knows nothing about any particular method.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from train.compression import FULL, step_seed
from train.config import Config
from train.engine.guard import Anomaly, Guard
from train.engine.meter import Meter
from train.engine.setup import (
    OutOfMemory,
    Run,
    SkippedSteps,
    StopFlag,
    architecture,
    build_engine,
    deepspeed_config,
    offloads_optimizer,
    out_of_memory_message,
    setup,
    steps_per_epoch_for,
    total_steps_for,
    use_bf16,
)
from train.methods.base import Method
from train.optim import clip_per_parameter

__all__ = ["RunResult", "OutOfMemory", "Run", "StopFlag", "architecture", "build_engine", "deepspeed_config",
           "offloads_optimizer", "setup", "steps_per_epoch_for", "total_steps_for", "train", "use_bf16"]
log = logging.getLogger("train")


@dataclass
class RunResult:
    steps: int  # optimizer steps completed (cumulative over resumes)
    stopped_early: bool  # a preemption signal ended the run before the last step
    output_dir: Path
    last_checkpoint: str | None
    engine: object  # the DeepSpeed engine (its .module is the method)


def train(cfg: Config, build_method: Callable[[Config], Method],
          evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None) -> RunResult:
    """Run (or resume) training of the method `build_method(cfg)` builds, as configured; every rank calls this.

    `evaluate(module, step)`, if given, runs on every rank after each checkpoint (not after a
    preemption stop); the scalars it returns go to TensorBoard and metrics.jsonl.
    """
    run = setup(cfg, build_method)
    engine, method, step = run.engine, run.engine.module, run.step
    meter = Meter(run.global_batch, run.world.world_size, run.device)
    data = iter(run.loader)
    aux_data = {name: iter(aux) for name, aux in run.aux_loaders.items()}
    last_tag, stopped, batch = None, False, None
    skips = SkippedSteps(cfg.train.max_skipped_steps, cfg.output_dir / "checkpoints", run.resumed_from)
    guard = Guard(run)
    try:
        while step < run.total_steps:
            try:
                scheduled = run.schedule(step)
                for micro in range(run.accum):
                    batch = meter.next(data)  # on the device, normalised
                    if run.compression.active:
                        batch["compression"] = run.compression.at(step, step_seed(cfg.run.seed, run.world.rank, step,
                                                                                  micro))
                    loss, report = engine(batch, step)
                    engine.backward(loss)
                    if cfg.optim.clip_per_param and micro == run.accum - 1:
                        clip_per_parameter(method, cfg.optim.clip_grad)
                    engine.step()
                    meter.add(report)
                step += 1
                skips.after_step(engine, step)
                meter.steps += 1
                method.on_step_end(step)
                if aux_data and step % method.aux_every == 0:
                    aux_batches = {name: meter.next(it) for name, it in aux_data.items()}  # on the device, normalised
                    with meter.aux():
                        meter.add(method.aux_step(aux_batches, step, scheduled["train/lr"] / run.peak_lr))
                setting = batch.get("compression", FULL)
                diagnosed = {}
                if run.diagnostic and step % cfg.compression.diagnose_every == 0 and not setting.is_full:
                    with meter.excluded():  # every rank takes part (gradients are averaged over ranks)
                        diagnosed = run.diagnostic(method, batch, step - 1, setting)
                last_good = f"the last good checkpoint is {skips.good_tag} in {cfg.output_dir / 'checkpoints'}"
                if run.online and (step % cfg.eval.every == 0 or step == run.total_steps):
                    with meter.excluded():  # collective: every rank embeds its share of the subset
                        scores = run.online(method.eval_encoder())
                        run.monitor.scalars(step, scores, console=False)
                        guard.check_collapse(step, scores, last_good)
                stopped = run.stop.agreed()
                save_now = stopped or step % cfg.run.ckpt_every == 0 or step == run.total_steps
                if save_now or step % cfg.run.log_every == 0:
                    if run.compression.active:  # throughput counts the tokens and FLOPs of this step's setting
                        scheduled.update(run.compression.describe(setting))
                    values = meter.values(step, scheduled, method, setting, engine.get_global_grad_norm(), run.loader,
                                          bool(aux_data), last_good)
                    run.monitor.scalars(step, {**values, **diagnosed})
                    guard.spikes.check(step, values, last_good)  # after the row: it shows the spike
                    meter.restart()
                elif diagnosed:
                    run.monitor.scalars(step, diagnosed, console=False)
                if cfg.run.image_every and step % cfg.run.image_every == 0:
                    run.monitor.images(step, method.visualize(batch))
                if save_now:
                    last_tag = run.save(step)
                    skips.saved(last_tag)
                    if evaluate is not None and not stopped:
                        run.monitor.scalars(step, evaluate(method, step), console=False)
                        meter.restart()  # checkpoint and evaluation time are not training throughput
                if stopped:
                    log.warning("stopped by signal at step %d; checkpoint %s", step, last_tag)
                    break
            except Anomaly as anomaly:  # run.on_anomaly: re-raised (stop), or back to the last good checkpoint
                step = guard.recover(anomaly, skips.good_tag)
                skips.rolled_back()
                meter.restart()
        skips.finish(step)
        if batch is not None and run.monitor.last_image_step != step:
            run.monitor.images(step, method.visualize(batch))  # the final panel, unless the loop just wrote it
    except torch.OutOfMemoryError:
        raise OutOfMemory(out_of_memory_message(cfg, build_method, run.ds_config, run.world.world_size, step)) from None
    finally:
        run.stop.restore()
        run.monitor.close()
    return RunResult(step, stopped, cfg.output_dir, last_tag, engine)
