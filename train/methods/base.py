"""The method contract as code: every hook the engine, evaluation, export and compression call, with its default.

A method is a `Method` registered under its `method.name` (`@register("mae")`). It has a `Config`
dataclass (the `method:` section; `validate(cfg)` for its own checks), is built as `cls(cfg)` from
the whole run config, holds an `encoder` (`train.models.vit.ViTEncoder`) and implements
`forward(batch, step) -> (loss, report)` (`report`: detached scalar tensors, no `.item()`; `step`:
optimizer steps completed, the same for every micro-batch of a step). Everything else below is
optional: the defaults do nothing, so the engine calls every hook on every method.
"""

from collections.abc import Callable

import torch
from torch import nn

from train.compression import FULL, Setting
from train.config import Config, ConfigError
from train.models.vit import ViTEncoder
from train.weights import ENCODER_PREFIX

METHODS: dict[str, type["Method"]] = {}  # method.name -> class, filled by @register


def register(name: str) -> Callable[[type["Method"]], type["Method"]]:
    """Class decorator: make a method selectable as `method.name=<name>`."""
    def add(cls: type["Method"]) -> type["Method"]:
        METHODS[name] = cls
        return cls
    return add


def method_class(name) -> type["Method"]:
    """The registered method called `name`, else a one-line error listing them."""
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


class Method(nn.Module):
    Config: type = None  # the method section's dataclass
    # compression knobs `forward` applies ("token_dropout", "patch_scaling"); read from the class itself
    # (`vars`), so a subclass that changes `forward` opts in again
    supported_compression: tuple[str, ...] = ()
    # attributes holding `train.models.ema.EMA` teachers (fp32, outside the module tree): saved with the
    # module (torch extra state) as {name: teacher state}; a method with more state adds to teacher_state()
    teachers: tuple[str, ...] = ()
    aux_every: int = 1  # aux_step runs after every aux_every-th optimizer step
    export_prefixes: tuple[str, ...] = (ENCODER_PREFIX,)  # state-dict keys `timm_state` reads from a checkpoint
    # what of the loss couples the images of a batch (contrastive negatives, BatchNorm, DINO's centre): config
    # validation then refuses gradient accumulation unless train.accept_micro_batch_statistics
    batch_coupled: str = ""
    # parameter-name prefixes that get optimizer groups of their own, which `frozen(step)` can leave out of a step
    freezable: tuple[str, ...] = ()

    encoder: ViTEncoder

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # torch saves extra state only for classes that define get_extra_state: only methods with teachers do
        if cls.teachers and cls.get_extra_state is nn.Module.get_extra_state:
            cls.get_extra_state = Method.teacher_state
            cls.set_extra_state = Method.load_teacher_state

    def set_total_steps(self, total_steps: int, steps_per_epoch: int | None = None) -> None:
        """Called once before the first step, for schedules over training progress (also for runs given in
        epochs); `steps_per_epoch` is None when the sample count is unknown."""

    def frozen(self, step: int) -> tuple[str, ...]:
        """The `freezable` prefixes whose parameters the optimizer leaves out of step `step` (no update, no
        weight decay, no optimizer state: as a gradient of None)."""
        return ()

    def on_step_end(self, step: int) -> None:
        """After each optimizer step, with the new step count (EMA teacher updates)."""

    def aux_streams(self) -> dict[str, tuple[list[str], int]]:
        """Data of the method's own, {name: (shard urls, per-rank batch size)}: the engine streams each (on the
        device, normalised, checkpointed) and hands a batch of every one to `aux_step`."""
        return {}

    def aux_step(self, batches: dict[str, dict], step: int, lr_scale: float) -> dict[str, torch.Tensor]:
        """State stepped outside DeepSpeed on `aux_streams` batches after every `aux_every`-th step (`lr_scale`:
        the lr schedule's value / its peak); returns a report like `forward`."""
        return {}

    def flops_per_image(self, compression: Setting = FULL) -> float | None:
        """Training FLOPs per image under `compression` (MFU logging, compression cost); None: unknown."""
        return None

    def tokens_per_image(self, compression: Setting = FULL) -> int | None:
        """Encoder tokens per image under `compression` (tokens/s logging); None: unknown."""
        return None

    def visualize(self, batch: dict) -> dict[str, torch.Tensor]:
        """Image panels {name: (N, 3, H, W)} in normalised units; called on every rank (ZeRO-3 gathers)."""
        return {}

    def eval_encoder(self) -> ViTEncoder:
        """The encoder evaluation and export take (DINO: its teacher's)."""
        return self.encoder

    @classmethod
    def timm_state(cls, state: dict, student: bool = False) -> dict[str, torch.Tensor]:
        """timm VisionTransformer tensors from a checkpoint's state (the keys under `export_prefixes`): the one
        `eval_encoder` returns; `student`: the trained `encoder` where that is another."""
        return {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}

    def teacher_state(self) -> dict:
        """The `teachers`' weights, as saved in checkpoints."""
        return {name: getattr(self, name).state_dict() for name in self.teachers}

    def load_teacher_state(self, state: dict) -> None:
        for name in self.teachers:
            getattr(self, name).load_state_dict(state[name])


def build_method(cfg: Config) -> Method:
    """The method `cfg.method.name` built from the run config."""
    return method_class(cfg.method.name)(cfg)
