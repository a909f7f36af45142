"""Streaming loader over WebDataset shards: infinite, split by node and worker, exactly resumable.

Each (rank, worker) reads an endless sequence of *segments*. Segment `s` is a list of shards chosen
by a seeded RNG: drawn with replacement (`resampled`, the default) or this reader's disjoint slice
of epoch `s`'s shard permutation. A segment's samples go through a seeded shuffle buffer that is
drained at the segment's end, so a reader's position is just `(segment, index)`. Augmentation is
seeded per sample by `(seed, rank, reader, segment, index)`.

Resuming therefore needs no replay: a reader jumps to its segment and skips `index` raw samples
without decoding them. The DataLoader hands out batches from its workers round-robin, so the
loader knows which reader produced each batch and checkpoints every reader's position plus the
next reader in turn. Every rank's stream is infinite, so all ranks run the same number of steps.

A checkpoint of another layout (world size x data.workers) continues from every old rank's state
(`continue_layout`): every new reader starts after the highest segment any old reader reached, so no
seed repeats. In epoch mode the rest of the old readers' epochs comes first, as one *carried-over*
segment per new reader: each old reader's unread shards (found by replaying its shuffle up to its
position, reading tar headers only) minus the samples it already read, split over the new readers.
No sample of those epochs is lost or read twice; the split is kept in the state, so that segment
resumes exactly too, or is split again by a further change of layout.

With a `device`, the loader also moves each batch there (the views' own `to_device` when they decode
on the device, else `data_pipeline.batch.to_device`), one batch ahead on a side CUDA stream so the copy and decode
overlap the training step; a batch's position is committed only when it is handed out.

Corrupt, empty or undecodable images and truncated tars are skipped and counted, never fatal.
"""

import ctypes
import ctypes.util
import functools
import glob
import json
import logging
import math
import os
import random
import re
import signal
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import _shuffle
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from data_pipeline.augment import IMAGE_KEYS, decode_image
from data_pipeline.batch import to_device

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_EMPTY_SEGMENTS = 20  # consecutive segments without a readable sample before giving up
MAX_BAD_IN_ROW = 200  # consecutive samples that fail to decode before giving up


class DataError(RuntimeError):
    """The data cannot feed training (nothing readable, nothing decodable); the message is one line."""


def key_and_extension(name: str) -> tuple[str | None, str | None]:
    """A tar member's (sample key, extension): the name up to its last dot, and what follows it.

    webdataset's default rule splits at the first dot of the file name, so the files of ImageNet- or
    img2dataset-style samples such as `n01440764_10026.JPEG.jpg` would get the extension `jpeg.jpg`
    and no image would ever be found. Multi-part extensions (`x.seg.png`) are not used by these shards.
    """
    base, dot, ext = name.rpartition(".")
    if not dot or not ext or "/" in ext or not base or base.endswith("/"):
        return None, None
    return base, ext


def tar_samples(urls: list[str], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """The samples of tar shards `urls` in order: webdataset's tarfile_samples with `key_and_extension`."""
    streams = url_opener(({"url": url} for url in urls), handler=handler)
    return group_by_keys(tar_file_expander(streams, handler=handler), keys=key_and_extension, handler=handler)


def why_undecodable(raw: dict, err: BaseException) -> str:
    """The reason a sample gave no image, in words, with the likely cause when the sample has no image file."""
    files = sorted(k for k in raw if not k.startswith("__"))
    if not any(k in raw for k in IMAGE_KEYS):
        return (f"no image file among its files {files} (an image is one of the extensions {list(IMAGE_KEYS)}; "
                f"keys are the file name up to its last dot, e.g. {raw.get('__key__')}.jpg)")
    return str(err)


@dataclass
class ShardSet:
    urls: list[str]
    num_samples: int | None = None
    classes: list[str] | None = None


def _is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def resolve_shards(spec: str, key: str = "data.train") -> ShardSet:
    """Shard URLs from a manifest .json (written by data_pipeline.shards) or a pattern.

    Patterns are webdataset's: braces (`train-{000000..000099}.tar`) and `::`-separated lists
    (`a.tar::b-{0..3}.tar`), plus shell globs for local files (`/data/train-*.tar`, sorted).
    Local shards are checked up front: a missing or unreadable one is an error naming it and the config key.
    """
    if not spec:
        raise ValueError(f"{key} is empty: give a manifest .json or a shard pattern")
    path = Path(spec)
    if _is_local(spec) and path.is_dir():
        manifests = sorted(p.name for p in path.glob("*.json"))
        hint = f"its manifest, e.g. {path / manifests[0]}" if manifests else "a manifest .json"
        raise ValueError(f"{key}: {spec} is a directory; give {hint}, or a shard pattern such as "
                         f"{path / 'train-{000000..000099}.tar'}")
    if spec.endswith(".json"):
        if not path.is_file():
            raise FileNotFoundError(f"{key}: manifest not found: {spec}")
        try:
            manifest = json.loads(path.read_text())
            urls = [s["url"] if not _is_local(s["url"]) else str(path.parent / s["url"]) for s in manifest["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{key}: {spec} is not a readable shard manifest ({type(err).__name__}: {err})") from None
        shards = ShardSet(urls, manifest.get("num_samples"), manifest.get("classes"))
    else:
        urls = []
        for url in expand_urls(spec):
            globbed = _is_local(url) and any(c in url for c in "*?[")
            urls += sorted(glob.glob(url)) if globbed else [url]
        shards = ShardSet(urls)
    if not shards.urls:
        raise ValueError(f"{key}: {spec!r} names no shards")
    local = [u for u in shards.urls if _is_local(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        what = "not a file" if Path(missing[0]).exists() else "shard not found"
        raise FileNotFoundError(f"{key}: {what}: {missing[0]} ({len(missing)} of {len(shards.urls)} missing)")
    unreadable = [u for u in local if not os.access(u, os.R_OK)]
    if unreadable:
        raise PermissionError(f"{key}: shard not readable (permissions): {unreadable[0]} "
                              f"({len(unreadable)} of {len(shards.urls)})")
    return shards


def unlabelled(spec: str, key: str = "data.val") -> str | None:
    """Why `spec` cannot be used where class labels are needed (its first sample has no `cls`), or None.

    Reads one sample of the first shard only, so commands check before encoding anything.
    """
    first = next(iter(tar_samples(resolve_shards(spec, key).urls[:1], SkipCounter())), None)
    if first is None:
        return f"{key}: no readable sample in the first shard of {spec}"
    if "cls" not in first:
        files = sorted(k for k in first if not k.startswith("__"))
        return f"{key}: {spec} has no class labels (its samples have no .cls file, only {files})"
    return None


def mix_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (stable across processes, unlike hash of strings)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


TAR_PROBLEMS = {  # tarfile's words -> what they mean for a shard
    "unexpected end of data": "truncated shard (the tar ends inside a file)",
    "empty file": "empty shard (no bytes)",
    "invalid header": "not a tar file (invalid header)",
    "bad checksum": "damaged tar header (bad checksum)",
}


def describe_skip(exn: BaseException) -> str:
    """One readable line for a skipped sample or shard: where (shard, key) and why, in words.

    webdataset appends the stream object and the URL to an exception's args; those reprs (and the
    ` @ <_io.BufferedReader ...>` it adds to messages) are replaced by the shard's URL.
    """
    args = [a for a in getattr(exn, "args", ()) if a is not None]
    if not args:
        return type(exn).__name__
    first = exn.strerror if isinstance(exn, OSError) and exn.strerror else str(args[0])
    message, _, stream = first.partition(" @ <")
    urls = [a for a in args[1:] if isinstance(a, str)] + re.findall(r"name='([^']*)'", stream)
    reason = TAR_PROBLEMS.get(message, message)
    return f"{urls[-1]}: {reason}" if urls and urls[-1] not in message else reason


class SkipCounter:
    """webdataset error handler that logs and counts instead of crashing (no sleep, unlike warn_and_continue).

    One line per skipped sample or shard (`describe_skip`); the same problem reported again at once by the
    next layer of webdataset's reader (a truncated tar raises in the member loop and in the shard loop) is
    counted once. `quiet`: count only (an evaluation reading shards the training already reported).
    """

    def __init__(self, count: int = 0, quiet: bool = False):
        self.count, self.quiet, self.last = count, quiet, None

    def __call__(self, exn: BaseException) -> bool:
        what = describe_skip(exn)
        if what == self.last:
            return True
        self.last = what
        self.count += 1
        if not self.quiet and (self.count <= 10 or self.count % 1000 == 0):
            log.warning("skipped (%d so far): %s", self.count, what)
        return True

    def ok(self) -> None:
        """A sample decoded: a problem met again from here on is a new one (e.g. the next pass over a shard)."""
        self.last = None


def die_with_parent(worker_id: int = 0) -> None:
    """Have the kernel kill this process when its parent dies, even by kill -9 (Linux; elsewhere a no-op).

    Usable as a DataLoader `worker_init_fn`.

    torch's worker loop also polls its parent, but only between samples: a worker blocked on a
    `pipe:` command or a slow file system would otherwise outlive a killed training process.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


def _exit_on_parent_sigterm(parent: int) -> None:
    """Wait for SIGTERM (blocked in every thread); exit at once if the parent sent it, otherwise ignore it."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def ignore_stop_signals(worker_id: int, parent: int | None = None) -> None:
    """DataLoader worker setup: leave preemption signals to the training process, never outlive it.

    Slurm signals every process of a job step, workers included; a worker killed by it would make
    the DataLoader raise in the middle of the step that is about to write the checkpoint. So SIGUSR1
    is ignored and SIGTERM is ignored unless it comes from the training process (`parent`): that is
    how torch and multiprocessing stop workers when the training process exits, after an error too
    (torch's own worker handler, which this replaces, exits on its parent's SIGTERM the same way).
    A plain SIG_IGN would make that exit wait forever for workers that never stop.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid() if parent is None else parent
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # inherited by threads started from here on
    threading.Thread(target=_exit_on_parent_sigterm, args=(parent,), daemon=True, name="sigterm-watch").start()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def collate(samples: list[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
            else torch.tensor([s[k] for s in samples]) for k in samples[0]}


class ShardStream(IterableDataset):
    """The per-rank stream of collated batches; one instance is copied into each DataLoader worker."""

    def __init__(self, urls: list[str], views: Callable | None, batch_size: int, *, rank: int, world_size: int,
                 seed: int, resampled: bool, shuffle_buffer: int, num_readers: int,
                 positions: dict | None = None, rotation: int = 0, carried: dict | None = None):
        self.urls, self.views, self.batch_size = list(urls), views, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_buffer, self.num_readers = resampled, shuffle_buffer, num_readers
        self.positions = positions or {}  # reader -> (segment, index, skipped)
        self.rotation = rotation
        self.carried = carried  # {"segment": s, "pieces": {reader: [[shard index, [keys read]], ...]}}
        self.collate = getattr(views, "collate", collate)
        slots = world_size * num_readers
        if not resampled and len(self.urls) < slots:
            raise ValueError(f"epoch mode needs at least one shard per reader: {len(self.urls)} shards < "
                             f"world size {world_size} x data.workers {num_readers}; write more shards, "
                             "lower data.workers, or set data.resampled=true")
        if resampled and len(self.urls) < slots and rank == 0:
            log.warning("%d shards for %d readers (world size %d x data.workers %d): readers often read the same "
                        "shard at the same time, so batches repeat samples; write more, smaller shards",
                        len(self.urls), slots, world_size, num_readers)

    def segment_shards(self, reader: int, segment: int) -> list[int]:
        """The shards (indices into `urls`) of regular segment `segment` of `reader`."""
        slots = self.world_size * self.num_readers
        slot = self.rank * self.num_readers + reader
        if self.resampled:
            rng = random.Random(mix_seed(self.seed, self.rank, reader, segment, 0))
            return rng.choices(range(len(self.urls)), k=max(1, math.ceil(len(self.urls) / slots)))
        order = list(range(len(self.urls)))
        random.Random(mix_seed(self.seed, segment, 1)).shuffle(order)
        return order[slot::slots]

    def segment_pieces(self, reader: int, segment: int) -> list[tuple[int, frozenset]]:
        """Segment `segment` of `reader` as (shard index, keys to leave out) pairs: its shards, or its carried-over
        part (by index, so shards moved to another path between runs are still found)."""
        if self.carried and segment == self.carried["segment"]:
            return [(shard, frozenset(keys)) for shard, keys in self.carried["pieces"].get(reader, [])]
        return [(shard, frozenset()) for shard in self.segment_shards(reader, segment)]

    def raw_samples(self, reader: int, segment: int, handler: SkipCounter,
                    pulled: list[set] | None = None) -> Iterator[dict]:
        """The segment's samples in their shuffled order. `pulled`: a list that gets, per piece begun, the set
        of keys taken from its shard so far, and every sample then carries `__piece__`, its piece's index."""

        def pieces():
            for number, (shard, leave_out) in enumerate(self.segment_pieces(reader, segment)):
                if pulled is not None:
                    pulled.append(set())
                for raw in tar_samples([self.urls[shard]], handler):
                    if raw["__key__"] in leave_out:
                        continue
                    if pulled is not None:
                        pulled[number].add(raw["__key__"])
                        raw = {**raw, "__piece__": number}
                    yield raw

        samples = pieces()
        if self.shuffle_buffer > 1:
            rng = random.Random(mix_seed(self.seed, self.rank, reader, segment, 2))
            samples = _shuffle(samples, self.shuffle_buffer, self.shuffle_buffer, rng=rng)
        return samples

    def unread(self, reader: int, segment: int, index: int) -> list[list]:
        """The [shard, keys to leave out] pieces of a segment left after its first `index` samples.

        Replays the segment's shuffle over the tar headers (nothing is decoded); a piece read to its end is
        dropped, one partly read gets the keys read so far added to the keys it leaves out."""
        pieces = self.segment_pieces(reader, segment)
        if index == 0:
            return [[shard, sorted(keys)] for shard, keys in pieces]
        read, pulled = [set() for _ in pieces], []
        samples = iter(self.raw_samples(reader, segment, SkipCounter(quiet=True), pulled))
        for _, raw in zip(range(index), samples):
            read[raw["__piece__"]].add(raw["__key__"])
        if next(samples, None) is None:  # read to the segment's end
            return []
        ended = len(pulled) - 1  # pieces before the one being pulled are out of their shards
        return [[shard, sorted(keys | read[number])] for number, (shard, keys) in enumerate(pieces)
                if number >= ended or pulled[number] - read[number]]

    def make_views(self, raw: dict, seed: int) -> dict:
        from_sample = getattr(self.views, "from_sample", None)  # views that need the encoded bytes
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding (slow)
            views = from_sample(raw) if from_sample else self.views(decode_image(raw))
        views["labels"] = int(raw.get("cls", -1))
        return views

    def __iter__(self) -> Iterator[dict]:
        try:
            yield from self.batches()
        except DataError as err:  # handed to the training process as a batch: one line there, not a worker traceback
            yield {"_error": str(err)}

    def batches(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = (worker + self.rotation) % self.num_readers
        segment, start, skipped = self.positions.get(reader, (0, 0, 0))
        handler = SkipCounter(skipped)
        batch: list[dict] = []
        empty, bad_in_row = 0, 0
        while True:
            read_any = False
            for index, raw in enumerate(self.raw_samples(reader, segment, handler)):
                if index < start:
                    continue  # resuming: skip already-consumed samples without decoding them
                read_any = True
                try:
                    batch.append(self.make_views(raw, mix_seed(self.seed, self.rank, reader, segment, index)))
                except Exception as err:
                    handler(err)
                    bad_in_row += 1
                    if bad_in_row >= MAX_BAD_IN_ROW:
                        raise DataError(f"rank {self.rank} reader {reader}: {bad_in_row} samples in a row could not "
                                        f"be decoded; the last, {raw.get('__key__')} in {raw.get('__url__')}: "
                                        f"{why_undecodable(raw, err)}") from None
                    continue
                bad_in_row = 0
                handler.ok()
                if len(batch) == self.batch_size:
                    out = self.collate(batch)
                    out["_position"] = torch.tensor([reader, segment, index + 1, handler.count])
                    yield out
                    batch = []
            empty = 0 if read_any else empty + 1
            if empty >= MAX_EMPTY_SEGMENTS:
                raise DataError(f"rank {self.rank} reader {reader}: {empty} segments in a row without a readable "
                                f"sample; check the shards (e.g. {self.urls[self.segment_shards(reader, segment)[0]]})")
            segment, start = segment + 1, 0


def shard_list_id(urls: list[str]) -> int:
    """The shard list by its file names in order (not their directories: shards copied elsewhere keep it)."""
    return zlib.crc32("\n".join(url.rsplit("/", 1)[-1] for url in urls).encode())


def epochs_of(state: dict, urls: list[str]) -> bool:
    """Whether a saved stream `state` holds positions in the epochs of `urls`: written in epoch mode over the same
    shard list (its positions index into that list's permutations)."""
    return not state.get("resampled", False) and state.get("shards", shard_list_id(urls)) == shard_list_id(urls)


def continues_exactly(state: dict, urls: list[str], world_size: int, workers: int, resampled: bool) -> bool:
    """Whether a rank's saved stream `state` continues exactly on its own: the same world size, number of readers
    and mode (`data.resampled`) and, in epoch mode, the same shard list (`epochs_of`)."""
    return (state["world_size"] == world_size and state["readers"] == max(1, workers)
            and state.get("resampled", resampled) == resampled and (resampled or epochs_of(state, urls)))


def continue_layout(states: list[dict], urls: list[str], *, rank: int, world_size: int, readers: int, seed: int,
                    resampled: bool, shuffle_buffer: int) -> tuple[dict, dict | None]:
    """(positions, carried-over segment) of `rank`'s readers continuing every old rank's stream `states`
    on another layout or shard list (see the module docstring).

    Every new reader starts at segment `last + 1`, after the highest segment `last` any old reader reached;
    the skip count carries on in rank 0's reader 0. In epoch mode that segment holds, for new slot `n` of `M`
    (slot = rank x readers + reader), the unread pieces of epochs up to `last` of each old slot `o` of `N`
    with `n % N == o % M`, split by piece over the new slots linked to the same old slot; unless the shard
    list changed, which leaves nothing to replay: the next epoch starts."""
    old_readers, old_world = states[0]["readers"], states[0]["world_size"]
    old_slots, new_slots = old_world * old_readers, world_size * readers
    positions = [{int(k): tuple(v) for k, v in state["positions"].items()} for state in states]

    def position(slot: int) -> tuple[int, int, int]:
        return positions[slot // old_readers].get(slot % old_readers, (0, 0, 0))

    last = max(position(o)[0] for o in range(old_slots))
    skipped = sum(p[2] for ps in positions for p in ps.values())
    start = {k: (last + 1, 0, skipped if rank == 0 and k == 0 else 0) for k in range(readers)}
    if resampled or not epochs_of(states[0], urls):
        return start, None  # nothing to replay: no epochs, or they were another mode's or shard list's
    streams = [ShardStream(urls, None, 1, rank=r, world_size=old_world, seed=state.get("seed", seed),
                           resampled=False, shuffle_buffer=state.get("shuffle_buffer", shuffle_buffer),
                           num_readers=old_readers, carried=state.get("carried")) for r, state in enumerate(states)]

    def pieces(reader: int) -> list[list]:
        slot, mine = rank * readers + reader, []
        for old in (o for o in range(old_slots) if slot % old_slots == o % new_slots):
            stream, old_reader = streams[old // old_readers], old % old_readers
            segment, index, _ = position(old)
            rest = stream.unread(old_reader, segment, index)
            for later in range(segment + 1, last + 1):
                rest += [[shard, sorted(keys)] for shard, keys in stream.segment_pieces(old_reader, later)]
            linked = [n for n in range(new_slots) if n % old_slots == old % new_slots]
            mine += rest[linked.index(slot)::len(linked)]
        return mine

    with ThreadPoolExecutor(readers) as pool:  # the replays read tar files: one thread per new reader
        return start, {"segment": last + 1, "pieces": dict(enumerate(pool.map(pieces, range(readers))))}


class StreamLoader:
    """Iterates a rank's batches from DataLoader workers and tracks the stream position for checkpoints.

    With `device`, batches come out on it, normalised with `mean`/`std` (see the module docstring).
    `state`: this rank's `state_dict()` from a checkpoint it continues exactly (`continues_exactly`), or every
    old rank's (a list) from one of another world size, number of workers or shard list (`continue_layout`).
    """

    def __init__(self, urls: list[str], views: Callable, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, resampled: bool = True, shuffle_buffer: int = 1000, workers: int = 0,
                 pin_memory: bool = False, state: dict | list[dict] | None = None,
                 device: torch.device | None = None,
                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        readers = max(1, workers)
        positions, rotation, carried, self.batches, self.device_skipped = {}, 0, None, 0, 0
        if isinstance(state, dict):
            if not continues_exactly(state, urls, world_size, workers, resampled):
                raise ValueError(f"stream state of {state['world_size']} ranks x {state['readers']} readers for "
                                 f"{world_size} x {readers} (or of another shard list): give every old rank's state "
                                 "(a list)")
            positions = {int(k): tuple(v) for k, v in state["positions"].items()}
            rotation, self.batches, carried = state["next_reader"], state["batches"], state.get("carried")
            self.device_skipped = state.get("device_skipped", 0)
        elif state:  # every rank's state of a checkpoint of another layout
            positions, carried = continue_layout(state, urls, rank=rank, world_size=world_size, readers=readers,
                                                 seed=seed, resampled=resampled, shuffle_buffer=shuffle_buffer)
            samples = sum(s["batches"] * s.get("batch_size", batch_size) for s in state)
            self.batches = samples // (world_size * batch_size)  # per rank, as if this layout had read them all
            self.device_skipped = sum(s.get("device_skipped", 0) for s in state) if rank == 0 else 0
            if rank == 0:
                what = ("every reader starts on fresh segments" if resampled else
                        "the shard list (data.train) or data.resampled changed: the rest of the old epoch cannot be "
                        "found, a new epoch starts" if carried is None else "the rest of the epoch is split over the "
                        f"new readers (segment {carried['segment']}), then the next epoch on the new layout")
                log.warning("data stream: %d ranks x %d readers over %d shards now vs %d x %d in the checkpoint; %s",
                            world_size, readers, len(urls), state[0]["world_size"], state[0]["readers"], what)
        self.readers, self.world_size, self.batch_size = readers, world_size, batch_size
        self.positions, self.next_reader = dict(positions), rotation
        self.device, self.mean, self.std = device, mean, std
        self.prepare = getattr(views, "to_device", to_device)
        self.stream = ShardStream(urls, views, batch_size, rank=rank, world_size=world_size, seed=seed,
                                  resampled=resampled, shuffle_buffer=shuffle_buffer, num_readers=readers,
                                  positions=positions, rotation=rotation, carried=carried)
        # its own generator: starting the workers must not draw from (and shift) the global torch RNG
        self.loader = DataLoader(self.stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 prefetch_factor=4 if workers else None, generator=torch.Generator(),
                                 worker_init_fn=functools.partial(ignore_stop_signals, parent=os.getpid()))

    @property
    def samples_seen(self) -> int:
        return self.batches * self.batch_size

    @property
    def skipped(self) -> int:
        """Samples skipped so far: unreadable in the workers plus undecodable on the device."""
        return sum(p[2] for p in self.positions.values()) + self.device_skipped

    def state_dict(self) -> dict:
        state = {"positions": {r: list(p) for r, p in self.positions.items()}, "next_reader": self.next_reader,
                 "readers": self.readers, "world_size": self.world_size, "batches": self.batches,
                 "batch_size": self.batch_size, "seed": self.stream.seed, "shuffle_buffer": self.stream.shuffle_buffer,
                 "resampled": self.stream.resampled, "shards": shard_list_id(self.stream.urls),
                 "device_skipped": self.device_skipped}
        carried = self.stream.carried
        if carried and any(p[0] <= carried["segment"] for p in self.positions.values()):
            state["carried"] = carried  # still being read (or not yet begun by a reader)
        return state

    def _to_device(self, batch: dict, side_stream) -> tuple[dict, object]:
        """(the batch on the device, a CUDA event marking the end of its preparation or None)."""
        if self.device is None:
            return batch, None
        if side_stream is None:
            return self.prepare(batch, self.device, self.mean, self.std), None
        with torch.cuda.stream(side_stream):
            batch = self.prepare(batch, self.device, self.mean, self.std)
            ready = torch.cuda.Event()
            ready.record(side_stream)
        return batch, ready

    def _commit(self, batch: dict, ready, position: list[int]) -> dict:
        if ready is not None:  # the step's stream waits for this batch only, not for the next one behind it
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ready)
            for value in batch.values():
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(current)
        reader, segment, index, skipped = position
        self.positions[reader] = (segment, index, skipped)
        self.next_reader = (reader + 1) % self.readers
        self.device_skipped += batch.pop("_skipped", 0)
        self.batches += 1
        return batch

    def __iter__(self) -> Iterator[dict]:
        on_cuda = self.device is not None and self.device.type == "cuda"
        side_stream = torch.cuda.Stream(self.device) if on_cuda else None
        pending = None
        for host_batch in self.loader:
            if "_error" in host_batch:
                raise DataError(host_batch["_error"])
            position = host_batch.pop("_position").tolist()
            batch, ready = self._to_device(host_batch, side_stream)
            if pending is not None:
                yield self._commit(*pending)
            pending = (batch, ready, position)
        if pending is not None:
            yield self._commit(*pending)


class EvalStream(IterableDataset):
    """Every readable sample of a shard set exactly once across ranks and DataLoader workers (evaluation).

    The `world_size x workers` readers split the shards; with fewer shards than readers, the readers of
    one shard take every k-th of its samples. Order is fixed; the last batch of a reader may be short.
    Unreadable samples are skipped, counted (`skipped`, per process) and logged.
    """

    def __init__(self, urls: list[str], views: Callable, batch_size: int, rank: int = 0, world_size: int = 1):
        self.urls, self.views, self.batch_size = list(urls), views, batch_size
        self.rank, self.world_size = rank, world_size
        self.skipped = SkipCounter(quiet=True)

    def assignment(self, slot: int, slots: int) -> list[tuple[str, int, int]]:
        """(shard url, stride, offset) triples reader `slot` of `slots` reads: samples with index % stride == offset."""
        shards = len(self.urls)
        if shards >= slots:
            return [(url, 1, 0) for url in self.urls[slot::slots]]
        shard = slot % shards
        return [(self.urls[shard], len(range(shard, slots, shards)), slot // shards)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch = []
        for url, stride, offset in self.assignment(self.rank * workers + worker, self.world_size * workers):
            for index, raw in enumerate(tar_samples([url], self.skipped)):
                if index % stride != offset:
                    continue
                try:
                    views = self.views(decode_image(raw))
                except Exception as err:
                    self.skipped(err)
                    continue
                self.skipped.ok()
                views["labels"] = int(raw.get("cls", -1))
                batch.append(views)
                if len(batch) == self.batch_size:
                    yield collate(batch)
                    batch = []
        if batch:
            yield collate(batch)
