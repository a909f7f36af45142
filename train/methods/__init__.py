"""Pretraining methods. Each is an nn.Module with a `Config` dataclass and

    forward(batch, step) -> (loss, report)   # report: detached scalar tensors to log

plus, where the method has them: `visualize(batch)` (image panels), `on_step_end(step)` (EMA
teachers), `set_total_steps(total, steps_per_epoch)` (called once before training, for schedules over
training progress; steps_per_epoch None when the sample count is unknown), `flops_per_image()` and
`tokens_per_image()` (throughput logging), `aux_streams()` +
`aux_step(batches, step, lr_scale)` (+ `aux_every`) for state stepped outside DeepSpeed on data of its
own (see DESIGN.md), and an `encoder` attribute (a `train.models.vit.ViTEncoder`) that evaluation and
export use, or the one `eval_encoder()` returns when the method has it (DINO: its EMA teacher's).
"""

from train.methods.classify import Finetune, LinearProbe
from train.methods.digpt import DiGPT
from train.methods.dino import DINO
from train.methods.hpm import HPM
from train.methods.mae import MAE
from train.methods.mapet import MaPeT
from train.methods.mlo_mae import MLOMAE
from train.methods.moco_v3 import MoCoV3
from train.methods.simclr import SimCLR

METHODS = {
    "mae": MAE,
    "hpm": HPM,
    "mapet": MaPeT,
    "digpt": DiGPT,
    "mlo_mae": MLOMAE,
    "moco_v3": MoCoV3,
    "dino": DINO,
    "simclr": SimCLR,
    "finetune": Finetune,  # supervised, on a pretrained encoder (train.eval.finetune)
    "linear_probe": LinearProbe,  # frozen encoder (train.eval.linear_probe)
}


def build_method(cfg):
    return METHODS[cfg.method.name](cfg)
