"""The k-CLIP tokenizer (MaPeT): a frozen teacher's patch features quantised by a k-means codebook, mapped to
code ids on the fly during training. The codebook is fitted by `python -m train.teachers.codebook`."""

from pathlib import Path

import torch

from train.config import ConfigError
from train.teachers.clip import FrozenTeacher, TeacherConfig
from train.teachers.kmeans import assign

FEATURE_SPACE = ("model", "img_size", "project")  # teacher settings that change what a code means


def load_codebook(path: str, num_codes: int, teacher: TeacherConfig, feature_dim: int,
                  key: str = "method.codebook") -> torch.Tensor:
    """The (num_codes, C) centroids saved at `path`, checked against the run's code count and teacher."""
    if not path or not Path(path).is_file():
        raise ConfigError(f"{key}: k-CLIP codebook not found: {path or '(empty)'}; fit it with "
                          "`python -m train.teachers.codebook --config <this run's config>`")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    centroids = saved["centroids"]
    fit_on = {k: saved["teacher"][k] for k in FEATURE_SPACE}
    ours = {k: getattr(teacher, k) for k in FEATURE_SPACE}
    if fit_on != ours:
        raise ConfigError(f"{key}: {path} was fit on the features of teacher {fit_on}, this run's is {ours}")
    if centroids.shape[0] != num_codes:
        raise ConfigError(f"{key}: {path} has {centroids.shape[0]} codes, method.num_codes is {num_codes}")
    if centroids.shape[1] != feature_dim:
        raise ConfigError(f"{key}: {path} was fit on {centroids.shape[1]}-d features, this teacher gives "
                          f"{feature_dim}-d ones (another method.teacher?)")
    return centroids.float()


class KCLIPTokenizer:
    """Teacher + codebook, outside the module tree: `tokenizer(images)` -> code ids (B, N) on the student grid."""

    def __init__(self, teacher: FrozenTeacher, centroids: torch.Tensor):
        self.teacher, self.centroids = teacher, centroids

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.centroids.device != images.device:
            self.centroids = self.centroids.to(images.device)
        _, patches = self.teacher(images)
        return assign(patches, self.centroids)
