"""Pretraining methods. Each is an nn.Module with a `Config` dataclass and

    forward(batch, step) -> (loss, report)   # report: detached scalar tensors to log

plus, where the method has them: `visualize(batch)` (image panels), `on_step_end(step)` (EMA
teachers), `set_run_length(total_steps, steps_per_epoch)` (called once before training, so schedules
are functions of the step), `flops_per_image()` and `tokens_per_image()` (throughput logging), and an
`encoder` attribute (a `train.models.vit.ViTEncoder`) that evaluation and export use, or the one
`eval_encoder()` returns when the method has it (DINO: its EMA teacher's).
"""

from train.methods.dino import DINO
from train.methods.mae import MAE
from train.methods.moco_v3 import MoCoV3
from train.methods.simclr import SimCLR

METHODS = {
    "mae": MAE,
    "moco_v3": MoCoV3,
    "dino": DINO,
    "simclr": SimCLR,
}


def build_method(cfg):
    return METHODS[cfg.method.name](cfg)
