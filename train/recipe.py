"""A run's validated config from its recipe: the one module that knows config, method registry and compression.

    load_config("train/configs/mae_demo.yaml", ["optim.base_lr=1e-3", "model.depth=4"])

reads the YAML files (later ones win) and the dotted overrides (`train.config.read_tree`), types
them with the method section of `method.name` from the registry, then checks: each section
(`train.config.validate`), what depends on the method (layer groups for `optim.layer_decay`, the
compression knobs it supports) and the method's own `Config.validate(cfg)`.
"""

from pathlib import Path

from train.compression import check_supported
from train.config import Config, ConfigError, from_dict, read_tree, validate
from train.methods import method_class


def load_config(path: str | Path | list | None = None, overrides: list[str] = (), world_size: int = 1) -> Config:
    """Read YAML deltas over the defaults (several files: later ones win), apply `a.b=value` overrides, validate."""
    cfg = from_dict(Config, read_tree(path, overrides), method_config=lambda name: method_class(name).Config)
    validate(cfg, world_size)
    method = method_class(cfg.method.name)
    if cfg.optim.layer_decay < 1 and not hasattr(method, "group_matcher"):
        raise ConfigError(f"optim.layer_decay needs a method with layer groups (group_matcher); "
                          f"{cfg.method.name} has none")
    check = getattr(cfg.method, "validate", None)
    if check is not None:
        check(cfg)
    # declared by the method class itself: a subclass that changes forward() must opt in again
    check_supported(cfg, vars(method).get("supported_compression", ()))
    d, t = cfg.data, cfg.train
    per_step = d.batch_size * world_size
    if method.batch_coupled and t.global_batch_size > per_step and not t.accept_micro_batch_statistics:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} > data.batch_size x world size = {d.batch_size} x "
            f"{world_size} means gradient accumulation, but {cfg.method.name}'s {method.batch_coupled} would come "
            f"from each micro-batch of {per_step}: use more GPUs or a smaller train.global_batch_size, or set "
            "train.accept_micro_batch_statistics=true")
    return cfg
