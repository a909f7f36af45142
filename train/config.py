"""Typed run configuration: the section dataclasses, YAML deltas + dotted overrides, section-local checks.

The bottom layer: it imports nothing of the project. `read_tree(files, overrides)` merges YAML files
(later ones win) and `a.b=value` overrides into one nested dict; a file may start with
`_base_: [a.yaml, ...]`: those files (paths relative to it, themselves with includes) are merged first,
in order, and the file's own keys go over them, so a recipe states only what differs from its bases.
`from_dict(Config, tree, method_config)` types it (the method section's dataclass comes from
`method_config(name)`); `validate` checks each section on its own. `train.recipe.load_config` composes
these with the method registry. Every mistake (unknown key, wrong type, impossible combination) raises
`ConfigError` with one line naming the key, before any model or process group is built.
"""

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
PRECISIONS = ("auto", "bf16", "fp32")
VIEWS = ("single", "moco_v3", "simclr", "dino", "finetune", "mapet")
DECODE = ("auto", "cpu", "gpu")
OPTIMIZERS = ("adamw", "sgd", "lars")
DEFAULT_METHOD = "mae"
ANOMALY_ACTIONS = ("stop", "rollback")


class ConfigError(ValueError):
    """A configuration mistake, reported as one actionable line."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = ""  # default: runs/<name>
    seed: int = 0
    log_every: int = 10  # steps between console lines / TensorBoard scalars (one host sync each)
    image_every: int = 0  # steps between TensorBoard image panels (0: only at the end)
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # completed checkpoints kept on disk
    resume: str = "auto"  # "auto": latest complete checkpoint in output_dir if any; "": never; or a path
    # a non-finite loss, more than train.max_skipped_steps skipped steps in a row or a loss spike: "stop" the run,
    # or "rollback": reload the last good checkpoint (not its data position) and go on past the bad data window
    on_anomaly: str = "stop"
    spike_factor: float = 0.0  # a logged loss above this x the median of the last spike_window logged ones (0: off)
    spike_window: int = 20  # logged losses the spike median is taken over (checks start once this many are logged)
    max_rollbacks: int = 3  # rollbacks in a run (counted across resumes) before it stops
    rollback_lr_scale: float = 1.0  # the lr schedule is multiplied by this at each rollback (cumulative)
    collapse_rankme: float = 0.0  # the online monitor's monitor/rankme below this is an anomaly too (0: off)


@dataclass
class DataConfig:
    train: str = ""  # manifest .json, or shard pattern (brace / pipe: URLs); "" = embedded digits demo
    val: str = ""  # held-out split (same forms) used by the end-of-run evaluation
    num_samples: int = 0  # samples in `train` when it is a pattern without a manifest
    batch_size: int = 64  # per-GPU micro batch
    workers: int = 4  # DataLoader worker processes per rank
    resampled: bool = True  # draw shards with replacement (True) or disjoint per-epoch splits (False)
    shuffle_buffer: int = 2000
    views: str = "single"  # single (MAE family) | moco_v3 | simclr (two views) | dino (2 global + local crops)
    #                        | finetune (crop, flip, RandAugment: supervised fine-tuning)
    #                        | mapet (centre square crop, colour jitter 0.4, no flip; + the un-jittered crop)
    crop_scale: tuple[float, float] | None = None  # of the (global) crops; unset: the recipe's (0.2 / 0.08 / 0.4)
    hflip: float = 0.5  # for "single"; the other recipes always flip with p=0.5
    jitter_strength: float = 1.0  # scales the recipe's colour jitter (SimCLR's color_jitter_strength)
    decode: str = "auto"  # auto (decode + augment on the GPU when CUDA is there; finetune: CPU) | cpu | gpu
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy of the finetune view ("": off)
    local_crops: int = 8  # dino
    local_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    init_values: float = 0.0  # LayerScale init of every block (timm `init_values`; MaPeT: 0.1); 0: no LayerScale
    pos_embed: str = "sincos"  # "sincos" (fixed, as MAE) or "learned"
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch_size / 256 (MAE's rule)
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # >= 0: half-cosine from weight_decay to this over training (DINO); < 0: constant
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 0.0
    warmup_steps: int = 0  # used when warmup_epochs is 0
    clip_grad: float = 0.0  # 0: off
    clip_per_param: bool = False  # clip each parameter's gradient to norm clip_grad (DINO's clip_gradients), not the
    #                               global norm over all parameters (DeepSpeed's gradient_clipping)
    decay_all: bool = False  # weight decay on every parameter, norms, biases and tokens too (MoCo v3's AdamW)
    optimizer: str = "adamw"  # adamw | sgd | lars (LARS: MAE's linear probe; needs ZeRO stage 0 and fp32)
    momentum: float = 0.9  # sgd and lars
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT/MAE fine-tuning): lr x decay^(depth + 1 - layer); 1: off


@dataclass
class TrainConfig:
    epochs: float = 0.0  # length in passes over `data.train` (needs its sample count) ...
    steps: int = 0  # ... or in optimizer steps; exactly one of them is set
    budget: float = 0.0  # > 0: run for this fraction of the training FLOPs of the uncompressed run of epochs/steps,
    #                      the number of steps chosen so that the compression schedule's total FLOPs equal it
    budget_flops: float = 0.0  # > 0: the same with an absolute budget of training FLOPs (all ranks together)
    global_batch_size: int = 0  # 0: batch_size x world size (no accumulation)
    accept_micro_batch_statistics: bool = False  # allow gradient accumulation for methods whose loss couples the
    #      images of a batch (contrastive negatives, BatchNorm, DINO's centre): each micro-batch is then its own batch
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed: str = "ds_configs/zero1.json"
    compile: str = ""  # torch.compile backend for every transformer block ("inductor" on GPU); "" = eager
    max_skipped_steps: int = 20  # optimizer steps in a row DeepSpeed may skip (overflow, non-finite grad norm)


@dataclass
class EvalConfig:
    at_end: bool = True  # k-NN + linear probe of the encoder (and of a random one) after training
    knn_k: int = 20
    knn_temperature: float = 0.07
    pool: str = "token"  # end-of-run features: the class token (MAE's linear probe) or "avg" of the patch tokens
    probe_epochs: int = 100
    every: int = 0  # steps between online monitors (k-NN, RankMe, feature std on a data.val subset); 0: off
    monitor_samples: int = 2000  # size of that fixed subset (rounded up to whole batches)


@dataclass
class ScheduleConfig:
    """A value as a pure function of training progress p in [0, 1] (train/compression.py:schedule_value)."""

    kind: str = "constant"  # constant (`start` throughout) | step | linear | cosine (start -> end by `until`)
    #                         | piecewise (`values` over equal stretches of training)
    start: float = 1.0  # value at the start of training
    end: float = 1.0  # value from `until` on
    until: float = 1.0  # fraction of training at which the value reaches `end`
    stages: int = 1  # step: constant stages between start and end (values evenly spaced)
    values: list[float] = field(default_factory=list)  # piecewise: value i over the i-th of len(values) stretches


@dataclass
class CompressionConfig:
    """Progressive sequence compression (train/compression.py); the defaults compress nothing."""

    keep_ratio: ScheduleConfig = field(default_factory=ScheduleConfig)  # token dropout: fraction of patches kept
    patch_scale: ScheduleConfig = field(default_factory=ScheduleConfig)  # patch size / model.patch_size (>= 1)
    diagnose_every: int = 0  # steps between gradient-error diagnostics (0: off)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = None  # the method's own dataclass, chosen by `method.name`
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.run.name}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # `X | None`: report X's own error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {tp}")
    if tp is Any:
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, args)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    else:
        raise ConfigError(f"{key}: unsupported config type {tp}")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Any, prefix: str = "", method_config: Callable[[str], type] | None = None) -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys and wrong types.

    For `Config`, `method_config(name)` gives the dataclass of the method section (`method.name`, default mae).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        if cls is Config and name == "method":
            method = data[name] or {}
            if not isinstance(method, dict):
                raise ConfigError(f"method: expected a mapping with a 'name', got {method!r}")
            kwargs[name] = from_dict(method_config(method.get("name", DEFAULT_METHOD)), method, "method.")
        else:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
    obj = cls(**kwargs)
    if cls is Config and obj.method is None:
        obj.method = method_config(DEFAULT_METHOD)()
    if cls is Config and "views" not in (data.get("data") or {}):
        obj.data.views = getattr(obj.method, "default_views", "single")  # the views the method trains on
    return obj


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.base_lr=1e-3")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else ""))
    return parsed


def _merge(tree: dict, delta: dict) -> dict:
    """`delta` over `tree`: nested mappings merge key by key, anything else replaces."""
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value
    return tree


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """One YAML file as a tree, its `_base_:` includes (relative to it, nested) merged underneath in order.

    An empty file, a key given twice in one mapping and a top level that is not a mapping are errors."""
    file = resolve_path(path)
    where = f" (in _base_ of {_chain[-1]})" if _chain else ""
    if not file.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    if file.resolve() in _chain:
        raise ConfigError(f"{file}: _base_ include cycle: {' -> '.join(map(str, _chain + (file.resolve(),)))}")
    try:
        delta = yaml.load(file.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{file}:{line} not valid YAML ({problem})") from None
    if delta is None:
        raise ConfigError(f"{file}: the file is empty; give at least one section of settings or drop it{where}")
    if not isinstance(delta, dict):
        raise ConfigError(f"{file}: top level must be a mapping of sections, got {type(delta).__name__}")
    bases = delta.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{file}: _base_ must be a file name or a list of file names, got {bases!r}")
    tree: dict = {}
    for base in bases:
        _merge(tree, read_yaml(file.parent / base, _chain + (file.resolve(),)))
    return _merge(tree, delta)


def read_tree(path: str | Path | list | None = None, overrides: list[str] = ()) -> dict:
    """YAML deltas (several files: later ones win) with `a.b=value` overrides applied, as one nested dict."""
    tree: dict = {}
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    for file in paths:
        _merge(tree, read_yaml(file))
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    return tree


def resolve_path(path: str | Path) -> Path:
    """A path as given, else relative to the repository, else to the installed package (which carries
    ds_configs/ and configs/ inside `train/`): ds_configs/... and train/configs/... from any directory."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    for candidate in (REPO_ROOT / p, PACKAGE_DIR / p):
        if candidate.exists():
            return candidate
    return REPO_ROOT / p


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject impossible combinations within the sections with one line each (the method's own checks and
    what depends on the method come after, in `train.recipe.load_config`)."""
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 1")
    if m.mlp_ratio <= 0 or not 0 <= m.drop_path < 1:
        raise ConfigError(f"model.mlp_ratio={m.mlp_ratio} must be > 0 and model.drop_path={m.drop_path} in [0, 1)")
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size={m.img_size} is not divisible by model.patch_size={m.patch_size}")
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    if m.pos_embed not in ("sincos", "learned"):
        raise ConfigError(f"model.pos_embed={m.pos_embed!r}: choose 'sincos' or 'learned'")
    if m.pos_embed == "sincos" and m.embed_dim % 4:
        raise ConfigError(f"model.embed_dim={m.embed_dim} must be divisible by 4 for sincos position embeddings")
    if m.init_values < 0:
        raise ConfigError(f"model.init_values={m.init_values} must be >= 0 (0: no LayerScale)")
    if d.batch_size < 1:
        raise ConfigError(f"data.batch_size={d.batch_size} must be >= 1")
    if d.workers < 0:
        raise ConfigError(f"data.workers={d.workers} must be >= 0")
    if d.views not in VIEWS:
        raise ConfigError(f"data.views={d.views!r}: choose one of {VIEWS}")
    for key in ("crop_scale", "local_crop_scale"):
        low, high = getattr(d, key) or (1, 1)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.{key}={getattr(d, key)} must satisfy 0 < min <= max <= 1")
    if d.decode not in DECODE:
        raise ConfigError(f"data.decode={d.decode!r}: choose one of {DECODE}")
    if d.decode == "gpu" and d.views in ("finetune", "mapet"):
        what = {"finetune": "RandAugment", "mapet": "centre crop + jitter"}[d.views]
        raise ConfigError(f"data.decode=gpu: data.views={d.views!r} ({what}) runs in the CPU workers; "
                          "use auto or cpu")
    if d.jitter_strength < 0:
        raise ConfigError(f"data.jitter_strength={d.jitter_strength} must be >= 0")
    if (t.epochs > 0) == (t.steps > 0):
        raise ConfigError(f"set exactly one of train.epochs ({t.epochs}) and train.steps ({t.steps})")
    if t.epochs > 0 and d.train and not d.train.endswith(".json") and d.num_samples <= 0:
        raise ConfigError("train.epochs needs the sample count: point data.train at a manifest .json "
                          "or set data.num_samples")
    if t.budget < 0 or t.budget_flops < 0 or (t.budget and t.budget_flops):
        raise ConfigError(f"train.budget={t.budget} and train.budget_flops={t.budget_flops}: set at most one, > 0")
    per_step = d.batch_size * world_size
    if t.global_batch_size and t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"data.batch_size x world size = {d.batch_size} x {world_size}")
    if t.max_skipped_steps < 1:
        raise ConfigError(f"train.max_skipped_steps={t.max_skipped_steps} must be >= 1")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}: choose one of {PRECISIONS}")
    if t.compile:
        from torch._dynamo import list_backends  # heavy: loaded only when compiling

        backends = list_backends(exclude_tags=())
        if t.compile not in backends:
            raise ConfigError(f"train.compile={t.compile!r}: not a torch.compile backend; choose one of {backends}")
    zero = check_deepspeed_json(cfg, world_size).get("zero_optimization", {})
    if t.compile and zero.get("stage", 0) == 3:
        raise ConfigError(f"train.compile={t.compile!r} with ZeRO stage 3 ({t.deepspeed}): torch.compile cannot trace "
                          "DeepSpeed's parameter-gathering hooks; use ZeRO-1/2 or train.compile=''")
    if o.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={o.optimizer!r}: choose one of {OPTIMIZERS}")
    if o.decay_all and o.layer_decay < 1:
        raise ConfigError("optim.decay_all=true with optim.layer_decay < 1: layer-wise groups exempt norms and biases; "
                          "choose one")
    if o.clip_per_param and o.clip_grad <= 0:
        raise ConfigError(f"optim.clip_per_param=true needs optim.clip_grad > 0 (got {o.clip_grad})")
    if not 0 < o.layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay={o.layer_decay} must be in (0, 1] (1: off)")
    if o.optimizer == "lars" and (zero.get("stage", 0) != 0 or t.precision != "fp32"):
        raise ConfigError("optim.optimizer=lars needs train.deepspeed=ds_configs/zero0.json and train.precision=fp32: "
                          "ZeRO partitions and bf16 master weights flatten parameters, breaking LARS's per-layer "
                          "trust ratio")
    if o.optimizer != "adamw" and zero.get("offload_optimizer", {}).get("device", "none") in ("cpu", "nvme"):
        raise ConfigError(f"optim.optimizer={o.optimizer}: optimizer offload runs DeepSpeed's CPU Adam; use adamw")
    if o.weight_decay < 0:
        raise ConfigError(f"optim.weight_decay={o.weight_decay} must be >= 0")
    if o.clip_grad < 0 or o.warmup_steps < 0 or o.warmup_epochs < 0 or t.epochs < 0 or t.steps < 0:
        raise ConfigError("optim.clip_grad, optim.warmup_steps, optim.warmup_epochs, train.epochs and train.steps "
                          "must be >= 0")
    if o.base_lr <= 0 or o.min_lr < 0:
        raise ConfigError(f"optim.base_lr={o.base_lr} must be > 0 and optim.min_lr={o.min_lr} >= 0")
    if cfg.eval.every < 0 or cfg.eval.monitor_samples < 4:
        raise ConfigError(f"eval.every={cfg.eval.every} must be >= 0 and eval.monitor_samples="
                          f"{cfg.eval.monitor_samples} >= 4")
    if cfg.eval.pool not in ("token", "avg"):
        raise ConfigError(f"eval.pool={cfg.eval.pool!r}: choose token or avg")
    if cfg.eval.every and d.train and not d.val:  # no data.train: the demo digits bring their val split
        raise ConfigError("eval.every: the online monitor reads a labelled subset of data.val; set data.val")
    if cfg.run.log_every < 1 or cfg.run.ckpt_every < 1:
        raise ConfigError("run.log_every and run.ckpt_every must be >= 1")
    check_guardrails(cfg)
    if cfg.run.resume not in ("", "auto") and not Path(cfg.run.resume).exists():
        raise ConfigError(f"run.resume: checkpoint not found: {cfg.run.resume}")
    check_accelerate_env(cfg, zero, world_size)


def check_guardrails(cfg: Config) -> None:
    """run.on_anomaly and its settings, one line each."""
    r = cfg.run
    if r.on_anomaly not in ANOMALY_ACTIONS:
        raise ConfigError(f"run.on_anomaly={r.on_anomaly!r}: choose one of {ANOMALY_ACTIONS}")
    if r.spike_factor and r.spike_factor <= 1:
        raise ConfigError(f"run.spike_factor={r.spike_factor} must be 0 (off) or > 1")
    if r.spike_window < 1 or r.max_rollbacks < 1:
        raise ConfigError(f"run.spike_window={r.spike_window} and run.max_rollbacks={r.max_rollbacks} must be >= 1")
    if not 0 < r.rollback_lr_scale <= 1:
        raise ConfigError(f"run.rollback_lr_scale={r.rollback_lr_scale} must be in (0, 1]")
    if r.collapse_rankme < 0 or (r.collapse_rankme and not cfg.eval.every):
        raise ConfigError(f"run.collapse_rankme={r.collapse_rankme} must be >= 0 and needs the online monitor "
                          "(eval.every > 0)")


def check_accelerate_env(cfg: Config, zero: dict, world_size: int, env: dict | None = None) -> None:
    """Under `accelerate launch`, its DeepSpeed and precision settings must agree with the run's, which decide.

    accelerate hands its config to the processes as ACCELERATE_* variables, while the run builds its own
    DeepSpeed engine from `train.deepspeed` and the run config: a differing value would be silently ignored.
    accelerate's defaults (no mixed precision, accumulation 1, no offload, no clipping) count as unset.
    """
    env = os.environ if env is None else env
    t, d = cfg.train, cfg.data

    def conflict(name: str, theirs: str, ours: str):
        raise ConfigError(f"accelerate launch: {name}={theirs} but the run has {ours}; the run's settings decide: "
                          "make them agree or drop the value from the accelerate config")

    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16":
        conflict("mixed_precision", precision, "no fp16 support (use bf16)")
    if precision == "bf16" and t.precision == "fp32":
        conflict("mixed_precision", precision, "train.precision=fp32")
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return
    stage = zero.get("stage", 0)
    if env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(stage)) != str(stage):
        conflict("zero_stage", env["ACCELERATE_DEEPSPEED_ZERO_STAGE"], f"stage {stage} (train.deepspeed={t.deepspeed})")
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and resolve_path(file).resolve() != resolve_path(t.deepspeed).resolve():
        conflict("deepspeed_config_file", file, f"train.deepspeed={t.deepspeed}")
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    if env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", offload):
        conflict("offload_optimizer_device", env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"],
                 f"{offload} (train.deepspeed={t.deepspeed})")
    accumulation = (t.global_batch_size or d.batch_size * world_size) // (d.batch_size * world_size)
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1") not in ("1", str(accumulation)):
        conflict("gradient_accumulation_steps", env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"],
                 f"{accumulation} (train.global_batch_size / (data.batch_size x {world_size} processes))")
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clip and float(clip) != cfg.optim.clip_grad:
        conflict("gradient_clipping", clip, f"optim.clip_grad={cfg.optim.clip_grad:g}")


def check_deepspeed_json(cfg: Config, world_size: int) -> dict:
    """The `train.deepspeed` JSON, checked as DeepSpeed will check it (its own validation), in one line."""
    path = resolve_path(cfg.train.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed: DeepSpeed config not found: {cfg.train.deepspeed}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed: {path} is not valid JSON ({err})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed: {path} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"train.deepspeed: {path}: remove '{key}'; the optimizer and lr schedule come from "
                              "optim.*")
    from deepspeed.runtime.config import DeepSpeedConfig

    micro = cfg.data.batch_size
    total = cfg.train.global_batch_size or micro * world_size
    # the global batch is left for DeepSpeed to derive with the world size it sees (1 before the group exists)
    batch = {"train_micro_batch_size_per_gpu": micro,
             "gradient_accumulation_steps": max(1, total // (micro * world_size))}
    try:
        DeepSpeedConfig({**ds, **batch})
    except Exception as err:  # pydantic's ValidationError (several lines) or DeepSpeed's own assertions
        errors = err.errors() if hasattr(err, "errors") else None
        if errors:
            first = errors[0]
            what = f"{'.'.join(map(str, first['loc']))}: {first['msg']} (got {first.get('input')!r})"
        else:
            what = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"train.deepspeed: {path}: DeepSpeed rejects it: {what}") from None
    return ds


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
