"""Run under torchrun by tests/test_elastic.py: resume a tiny run (elastically when the world size differs from
the checkpoint's) and save, from rank 0, what was loaded: full fp32 weights, Adam moments and step, extra state."""

import logging
import os
import sys

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from train.engine.setup import setup
from train.methods import build_method
from train.recipe import load_config


def main(out: str, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(None, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    run = setup(cfg, build_method)
    module = run.engine.module
    state = {"step": run.step, "weights": {}, "exp_avg": {}, "exp_avg_sq": {}, "adam_step": set()}
    # ZeRO-1/2 link the moments to the parameters at the first step; the reader needs them now
    getattr(run.engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    for name, p in ((n, p) for n, p in module.named_parameters() if p.requires_grad):  # ZeRO-3: collective
        state["weights"][name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = safe_get_full_optimizer_state(p, key).clone()
    state["adam_step"] = sorted({float(s["step"]) for s in run.optimizer.state.values() if "step" in s})
    state["extra"] = {k: v for k, v in module.state_dict().items() if k.endswith("_extra_state")}
    state["data"] = run.loader.state_dict()
    if run.world.is_main:
        torch.save(state, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
