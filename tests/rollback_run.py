"""Run under torchrun by tests/test_guardrails.py: a tiny training run in which only rank `bad_rank` sees a NaN
loss, on its forward call `bad_call` (0-based), as a bad sample in one rank's data would make it."""

import logging
import os
import sys
from types import SimpleNamespace

from helpers import poison
from train.engine import train
from train.methods import build_method
from train.recipe import load_config


def main(bad_rank: int, bad_call: int, overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO)
    bad = {bad_call} if int(os.environ["RANK"]) == bad_rank else set()
    poison(SimpleNamespace(setattr=setattr), bad, lambda loss: loss * float("nan"))
    train(load_config(None, overrides, world_size=int(os.environ["WORLD_SIZE"])), build_method)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
