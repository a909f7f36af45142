"""Run under torchrun by tests/test_elastic.py: resume a tiny run (elastically when the world size differs from
the checkpoint's) and save, from rank 0, what was loaded: full fp32 weights, Adam moments and step, param group
hyperparameters, extra state, data positions; then what `FIXED_STEPS` optimizer steps on a fixed global batch
give: each step's global mean loss, the Adam step and the full fp32 weights after them.

The fixed batch makes a run on another layout comparable: the data stream legitimately moves to fresh segments on
an elastic resume, so its own batches differ, but a global batch of `train_batch_size` rows cut into micro-batches
of `data.batch_size` is the same sum of micro-batch gradients on N ranks x a accumulations as on M ranks x b: rank
r's micro-batch k is global micro-batch r * accum + k (its rows, and its masking noise, seeded from that index)."""

import copy
import logging
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from data_pipeline.batch import batch_shapes, to_device
from train.engine.setup import setup
from train.methods import build_method
from train.recipe import load_config

FIXED_STEPS = 2
FIXED_SEED = 1234  # the pixels and labels of the fixed batch; micro-batch i's masking noise is seeded FIXED_SEED + i


def full_weights(module) -> dict:
    """Every trained parameter's full fp32 (master) weight; collective under ZeRO-3."""
    return {n: safe_get_full_fp32_param(p).clone() for n, p in module.named_parameters() if p.requires_grad}


def frozen_weights(module) -> dict:
    """Every frozen parameter, whole (gathered under ZeRO-3: collective), as fp32."""
    out = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.detach().float().clone()
    return out


def fixed_batch(cfg, rows: int) -> dict:
    """`rows` uint8 images (in the shapes of the run's views) and labels, the same on every rank and layout."""
    g = torch.Generator().manual_seed(FIXED_SEED)
    batch = {"labels": torch.randint(0, 1000, (rows,), generator=g)}
    for key, shape in batch_shapes(cfg.data, cfg.model.img_size, rows).items():
        batch[key] = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return batch


def fixed_steps(run) -> list[float]:
    """`FIXED_STEPS` optimizer steps as the training loop takes them (schedule, `run.accum` micro-batches of
    forward / backward / step, `on_step_end`), on the fixed global batch; each step's global mean loss."""
    engine, cfg, rank = run.engine, run.cfg, run.world.rank
    micro = cfg.data.batch_size
    host = fixed_batch(cfg, run.global_batch)
    out = []
    for step in range(run.step, run.step + FIXED_STEPS):
        run.schedule(step)
        total = torch.zeros((), dtype=torch.float64)
        for k in range(run.accum):
            index = rank * run.accum + k  # the global micro-batch index: the same rows and noise on any layout
            rows = {key: value[index * micro:(index + 1) * micro] for key, value in host.items()}
            torch.manual_seed(FIXED_SEED + index)
            loss, _ = engine(to_device(rows, run.device, cfg.data.mean, cfg.data.std), step)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double().cpu()
        engine.module.on_step_end(step + 1)
        if dist.is_initialized():
            dist.all_reduce(total)
        out.append(total.item() / (run.accum * run.world.world_size))
    return out


def main(out: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    run = setup(cfg, build_method)
    module = run.engine.module
    # ZeRO-1/2 link the moments to the parameters at the first step; the reader needs them now
    getattr(run.engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    state = {"step": run.step, "weights": full_weights(module), "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in ((n, p) for n, p in module.named_parameters() if p.requires_grad):  # ZeRO-3: collective
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = safe_get_full_optimizer_state(p, key).clone()
    state["adam_step"] = sorted({float(s["step"]) for s in run.optimizer.state.values() if "step" in s})
    state["extra"] = copy.deepcopy({k: v for k, v in module.state_dict().items() if k.endswith("_extra_state")})
    state["data"] = run.loader.state_dict()
    state["groups"] = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in run.optimizer.param_groups]
    state["frozen"] = frozen_weights(module)
    state["accum"] = run.accum
    state["fixed_losses"] = fixed_steps(run)
    state["fixed_weights"] = full_weights(module)
    state["fixed_adam_step"] = sorted({float(s["step"]) for s in run.optimizer.state.values() if "step" in s})
    if run.world.is_main:
        torch.save(state, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
