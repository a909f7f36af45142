"""Self-supervised pretraining of Vision Transformers on DeepSpeed, WebDataset and timm."""

import os

if "DS_ACCELERATOR" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # tell DeepSpeed up front instead of letting it warn
