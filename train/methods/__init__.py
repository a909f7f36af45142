"""Pretraining methods. Each is an nn.Module with a `Config` dataclass and

    forward(batch, step) -> (loss, report)   # report: detached scalar tensors to log

plus, where the method has them: `visualize(batch)` (image panels), `on_step_end(step)` (EMA
teachers), `set_total_steps(total)` (called once before training, for schedules over training
progress), `flops_per_image()` and `tokens_per_image()` (throughput logging), and an `encoder`
attribute (a `train.models.vit.ViTEncoder`) that evaluation and export use.
"""

from train.methods.hpm import HPM
from train.methods.mae import MAE

METHODS = {
    "mae": MAE,
    "hpm": HPM,
}


def build_method(cfg):
    return METHODS[cfg.method.name](cfg)
