"""Self-supervised pretraining of Vision Transformers on DeepSpeed, WebDataset and timm."""

import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # tell DeepSpeed up front instead of letting it warn

import warnings

# Known deprecations raised from inside DeepSpeed on every ZeRO step (once per rank per call site, so
# a multi-rank log fills with them); nothing in this project can act on them. torch 2.14 deprecates
# `torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor`, which DeepSpeed's ZeRO
# partitioning calls, and `torch.cuda.amp.custom_fwd/custom_bwd`, which its ZeRO-3 linear layer uses.
for _message in (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                 r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)
