"""Crash-safe checkpoints on top of DeepSpeed's sharded save/load.

Layout under `<output_dir>/checkpoints/`:
    step_00001000/          DeepSpeed's files (model, ZeRO-partitioned optimizer), plus
        rank_00000.pt       per-rank RNG states and data-stream position
        COMPLETE            written last, once every rank has finished writing
    latest                  the tag of the newest complete checkpoint, replaced atomically
    step_00001000_universal/  DeepSpeed's universal form of a tag, written by an elastic resume
                            (`to_universal`); removed with its tag, and when the tag is written again

A crash while writing leaves `latest` on the previous complete checkpoint; `find_resume_tag`
falls back to the newest directory with a COMPLETE marker if `latest` is missing or points at
an incomplete one. Rank 0 decides and broadcasts, so all ranks load the same tag.
"""

import json
import logging
import os
import random
import re
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from train.distributed import barrier, broadcast_object

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d{8,})$")
MARKER = "COMPLETE"
UNIVERSAL = "_universal"  # `<tag>_universal/`: DeepSpeed's universal form of checkpoint `<tag>` (elastic resume)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / MARKER).exists()]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def save(engine, ckpt_dir: Path, step: int, meta: dict, rank_state: dict, rank: int, keep_last: int) -> str:
    """Write a checkpoint with every rank, then mark it complete and move `latest` to it.

    `meta` (JSON: step, model and method settings) goes into the COMPLETE marker, so a resume can
    check compatibility before touching DeepSpeed.
    """
    tag = tag_for(step)
    if rank == 0:
        (ckpt_dir / tag / MARKER).unlink(missing_ok=True)  # overwriting an old tag: incomplete until done
        remove_universal(ckpt_dir, tag)  # its universal form is the old content's (to_universal trusts its marker)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"rank_{rank:05d}.pt")
    barrier()
    if rank == 0:
        _atomic_write(ckpt_dir / tag / MARKER, json.dumps({"step": step, "time": time.time(), **meta}))
        _atomic_write(ckpt_dir / "latest", tag)
        for old in complete_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            if old != tag:
                remove_universal(ckpt_dir, old)
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return tag


def remove_universal(ckpt_dir: Path, tag: str) -> None:
    """Remove what `to_universal` wrote beside checkpoint `tag`: `<tag>_universal/`, its `.in` staging folder and
    a `.failed` note."""
    for path in (ckpt_dir / f"{tag}{UNIVERSAL}", ckpt_dir / f".{tag}{UNIVERSAL}.in"):
        shutil.rmtree(path, ignore_errors=True)
    (ckpt_dir / f".{tag}{UNIVERSAL}.failed").unlink(missing_ok=True)


def find_resume_tag(ckpt_dir: Path) -> str | None:
    """The tag to resume from (decided by rank 0, broadcast to all), or None when there is none."""
    tag = None
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        latest = ckpt_dir / "latest"
        if latest.is_file() and (ckpt_dir / latest.read_text().strip() / MARKER).exists():
            tag = latest.read_text().strip()
        else:
            tags = complete_tags(ckpt_dir)
            tag = tags[-1] if tags else None
            if latest.is_file():
                log.warning("%s points at an incomplete checkpoint; resuming from %s instead", latest, tag)
    return broadcast_object(tag)


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """`run.resume` ("auto", "" or a path to a checkpoint dir / tag dir) -> (checkpoint dir, tag)."""
    if not resume:
        return None
    if resume == "auto":
        tag = find_resume_tag(ckpt_dir)
        return (ckpt_dir, tag) if tag else None
    path = Path(resume)
    if TAG_RE.match(path.name):
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"run.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
        return path.parent, path.name
    tag = find_resume_tag(path)
    if tag is None:
        raise FileNotFoundError(f"run.resume: no complete checkpoint under {path}")
    return path, tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def read_fp32_state(tag_dir: Path, prefixes: tuple[str, ...] = ()) -> dict:
    """fp32 weights of one complete DeepSpeed checkpoint (any ZeRO stage and world size): the keys under
    `prefixes` (all when empty), the only reader of weights out of DeepSpeed's files.

    Trained parameters come from the fp32 master weights (DeepSpeed's zero_to_fp32, read lazily: only the
    tensors asked for are materialised); what that leaves out (extra state such as EMA teachers, frozen
    parameters under ZeRO-0/1, e.g. fixed sin-cos positions) from the rank-0 model-state file.
    """
    tag_dir = Path(tag_dir)
    wanted = (lambda key: key.startswith(prefixes)) if prefixes else (lambda key: True)
    state = {}
    if any(tag_dir.glob("*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: DeepSpeed

        lazy = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name, lazy_mode=True)
        state = {k: v.contiguous().float() for k, v in lazy.items() if wanted(k)}
    state.update(read_module_state(tag_dir, lambda key: wanted(key) and key not in state))
    return state


def read_module_state(tag_dir: Path, wanted=lambda key: True) -> dict:
    """The `wanted` entries of the rank-0 model-state file of checkpoint `tag_dir` (ZeRO 0-2: every weight, buffer
    and extra state; ZeRO-3: buffers and extra state, the weights being empty placeholders), floats as fp32."""
    model_states = sorted(Path(tag_dir).glob("*model_states.pt"))  # ZeRO 0-2: mp_rank_00; ZeRO-3: rank 0's file
    if not model_states:
        return {}
    saved = torch.load(model_states[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in saved.items()
            if wanted(k) and (k.endswith("_extra_state") or v.numel() > 0)}  # ZeRO-3: empty placeholders


def saved_partitioning(tag_dir: Path) -> int:
    """How checkpoint `tag_dir` holds the optimizer: 3 (ZeRO-3 files), 1 (ZeRO-1/2: one format) or 0 (not
    partitioned: ZeRO-0, any world size loads it as it is)."""
    if any(Path(tag_dir).glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 1 if any(Path(tag_dir).glob("*_optim_states.pt")) else 0


def complete_tag_dir(path: str | Path, key: str = "checkpoint") -> Path:
    """The `step_N` directory `path` names, or the newest complete one under a checkpoints directory."""
    path = Path(path)
    ckpt_dir, tag = (path.parent, path.name) if TAG_RE.match(path.name) else (path, find_resume_tag(path))
    if tag is None or not (ckpt_dir / tag / MARKER).exists():
        raise FileNotFoundError(f"{key}: {path}: not a complete checkpoint (no {MARKER} marker) nor a directory "
                                "holding one")
    return ckpt_dir / tag


def load_weights(module: torch.nn.Module, path: str | Path) -> int:
    """Load the model weights of a complete checkpoint (a `step_N` directory, or the newest complete one
    under a checkpoints directory; any ZeRO stage and world size) into a plain `module`; returns its step."""
    tag_dir = complete_tag_dir(path)
    module.load_state_dict(read_fp32_state(tag_dir))
    return read_meta(tag_dir.parent, tag_dir.name)["step"]


def to_universal(ckpt_dir: Path, tag: str, rank: int, poll_seconds: float = 1.0,
                 give_up_hours: float = 6.0) -> str:
    """Rank 0 converts checkpoint `tag` into DeepSpeed's universal form (per-parameter fp32 weights and Adam
    moments, any world size) beside it, once; every rank returns its tag for `load` with `load_universal`.

    The other ranks wait by watching the file system, not in a collective: a large model's conversion can
    outlast the process group's timeout (DEEPSPEED_TIMEOUT, 10 minutes), which would end the resume and so
    every requeue of it. A failed conversion is written beside the tag and raised on every rank."""
    out = ckpt_dir / f"{tag}{UNIVERSAL}"
    failed = ckpt_dir / f".{tag}{UNIVERSAL}.failed"
    if rank == 0:
        failed.unlink(missing_ok=True)  # an earlier attempt's
    barrier()
    if rank == 0 and not (out / MARKER).exists():
        log.info("elastic resume: converting %s to DeepSpeed's universal form", ckpt_dir / tag)
        try:
            convert_to_universal(ckpt_dir, tag, out)
        except Exception as err:
            shutil.rmtree(out, ignore_errors=True)
            _atomic_write(failed, f"{type(err).__name__}: {err}")
    waited, deadline = time.monotonic(), time.monotonic() + give_up_hours * 3600
    while not (out / MARKER).exists() and not failed.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"elastic resume: rank 0 did not convert {ckpt_dir / tag} to DeepSpeed's universal "
                               f"form within {give_up_hours:g} h (no {out / MARKER})")
        time.sleep(poll_seconds)
    if failed.exists():
        raise RuntimeError(f"elastic resume: converting {ckpt_dir / tag} to DeepSpeed's universal form failed on "
                           f"rank 0: {failed.read_text()}")
    if rank != 0 and time.monotonic() - waited > 60:
        log.info("elastic resume: waited %.0f s for rank 0's conversion", time.monotonic() - waited)
    return out.name


def convert_to_universal(ckpt_dir: Path, tag: str, out: Path) -> None:
    """DeepSpeed's `ds_to_universal` of checkpoint `tag` into `out`, marked complete at the end."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal  # heavy: DeepSpeed

    # the converter saves every module entry as a tensor: it reads a copy without extra state (EMA
    # teachers), and the original model files, which the engine loads the module from, go beside its output
    staged = ckpt_dir / f".{tag}{UNIVERSAL}.in"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        models = sorted((ckpt_dir / tag).glob("*model_states.pt"))
        for f in (ckpt_dir / tag).iterdir():
            if f not in models:
                (staged / f.name).symlink_to(f.resolve())
        for f in models:
            saved = torch.load(f, map_location="cpu", weights_only=False)
            saved["module"] = {k: v for k, v in saved["module"].items() if torch.is_tensor(v)}
            torch.save(saved, staged / f.name)
        ds_to_universal(Namespace(input_folder=str(staged), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True))  # ours has no Megatron info
        for f in models:
            shutil.copy2(f, out / f.name)
    finally:
        shutil.rmtree(staged)
    _atomic_write(out / MARKER, (ckpt_dir / tag / MARKER).read_text())


def load(engine, ckpt_dir: Path, tag: str, rank: int, universal: bool = False) -> tuple[dict, dict | None]:
    """Load model + optimizer into `engine`; return (client_state, this rank's state or None).

    `universal`: the checkpoint has another world size; load its universal form (`to_universal`)."""
    load_tag = to_universal(ckpt_dir, tag, rank) if universal else tag
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if universal else []
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / load_tag}")
    if universal:
        restore_untrained(engine.module, ckpt_dir / tag)
        repair_universal_optimizer(optimizer, groups)
    rank_file = ckpt_dir / tag / f"rank_{rank:05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.exists() else None
    return client_state, rank_state


def restore_untrained(module: torch.nn.Module, tag_dir: Path) -> None:
    """Load what DeepSpeed's universal load leaves as built, the state outside the optimizer: buffers, extra
    state (EMA teachers) and frozen parameters (e.g. MoCo v3's random patch projection), from checkpoint `tag_dir`.

    ZeRO-3 partitions frozen parameters too: their values come from DeepSpeed's fp32 reader and are written
    under `GatheredParameters` (a collective: every rank takes the parameters in the same order)."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    partitioned = {name: p for name, p in module.named_parameters() if not p.requires_grad and hasattr(p, "ds_id")}
    module.load_state_dict(read_module_state(tag_dir, lambda key: key not in trained and key not in partitioned),
                           strict=False)
    if not partitioned:
        return
    import deepspeed  # heavy

    values = read_fp32_state(tag_dir, tuple(partitioned))
    for name, param in partitioned.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.copy_(values[name].to(param.dtype))


def repair_universal_optimizer(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    """Undo two faults of DeepSpeed's ZeRO-3 universal load (ZeRO-1/2 load correctly; this is a no-op there).

    It gives every param group the hyperparameters of the checkpoint's group 0 (our group 0 has no weight decay,
    so every parameter lost it, and layer decay's `lr_scale`): `groups` (the engine's own, from this run's config,
    taken before the load) go back. And it stores one `step` tensor for every parameter partition, which Adam
    increments in place once per partition, so the step ran ahead by the partition count per optimizer step:
    each partition gets its own copy."""
    for group, own in zip(optimizer.param_groups, groups, strict=True):
        group.update(own)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def rank_states(tag_dir: Path) -> list[dict]:
    """Every rank's state file of checkpoint `tag_dir` (RNG and data positions), in rank order."""
    return [torch.load(f, weights_only=False) for f in sorted(Path(tag_dir).glob("rank_*.pt"))]
