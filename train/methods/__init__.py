"""Pretraining methods. Each is an nn.Module with a `Config` dataclass and

    forward(batch, step) -> (loss, report)   # report: detached scalar tensors to log

plus, where the method has them: `visualize(batch)` (image panels), `on_step_end(step)` (EMA
teachers), `flops_per_image()` and `tokens_per_image()` (throughput logging), and an `encoder`
attribute (a `train.models.vit.ViTEncoder`) that evaluation and export use.
"""

from train.methods.digpt import DiGPT
from train.methods.mae import MAE
from train.methods.mapet import MaPeT

METHODS = {
    "mae": MAE,
    "mapet": MaPeT,
    "digpt": DiGPT,
}


def build_method(cfg):
    return METHODS[cfg.method.name](cfg)
