"""What the evaluation commands share: logging, one-line errors, class counts and result files."""

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from train.config import ConfigError
from train.distributed import world_info_from_env

log = logging.getLogger("train")


def run_command(body: Callable[[], None]) -> int:
    """Run a command's body with rank-0 INFO logging; a user mistake is one line on stderr and exit code 2."""
    rank = world_info_from_env().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        body()
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def manifest_classes(shards: str) -> list[str] | None:
    """The class names a shard manifest lists (None for a pattern or a manifest without them)."""
    if not shards or not shards.endswith(".json") or not Path(shards).is_file():
        return None
    return json.loads(Path(shards).read_text()).get("classes") or None


def num_classes_of(train: str, val: str, requested: int = 0, key: str = "method.num_classes") -> int | None:
    """The class count the manifests of `train` and `val` agree on (and `requested`, when set), else an error."""
    train_classes, val_classes = manifest_classes(train), manifest_classes(val)
    if train_classes and val_classes and train_classes != val_classes:
        raise ConfigError(f"mismatched classes: {train} lists {len(train_classes)} classes, {val} lists "
                          f"{len(val_classes)} (or in another order)")
    known = len(train_classes or val_classes or [])
    if requested and known and requested != known:
        raise ConfigError(f"{key}={requested} but {train if train_classes else val} lists {known} classes")
    return requested or known or None


def write_results(out_dir: Path, name: str, result: dict, scalars: dict[str, float], step: int) -> Path:
    """Rank 0 writes `out_dir/eval/<name>.json` and the scalars to TensorBoard (`out_dir/tb`) at `step`."""
    path = out_dir / "eval" / f"{name}.json"
    if world_info_from_env().rank != 0:
        return path
    from torch.utils.tensorboard import SummaryWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    with SummaryWriter(str(out_dir / "tb")) as writer:
        for key, value in scalars.items():
            writer.add_scalar(key, value, step)
    log.info("results: %s (TensorBoard: %s)", path, out_dir / "tb")
    return path
