"""Device batches one step ahead: the next batch's host-to-device copy overlaps the current step.

On CUDA the copy (from the DataLoader's pinned memory) and the on-device conversion run on a side
stream while the current step's kernels run on the compute stream; the compute stream waits for
the copy only when it uses the batch. On CPU the same object transfers synchronously.

The wrapped loader has already produced one batch more than the training loop has consumed, so
`state_dict()`, `skipped` and `samples_seen` report the loader as it was when the *consumed* batch
came out: a checkpoint taken after a step resumes at the next unseen batch.
"""

from collections.abc import Callable

import torch


class DevicePrefetcher:
    def __init__(self, loader, transfer: Callable[[dict], dict], device: torch.device):
        """`loader`: a StreamLoader; `transfer(host_batch) -> device_batch` (e.g. `to_device`)."""
        self.loader, self.transfer, self.device = loader, transfer, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.batches = iter(loader)
        self.ahead = None  # (device batch, loader state after it) for the next call
        self.exhausted = False
        self.consumed = (loader.state_dict(), loader.skipped, loader.samples_seen)

    def _fetch(self):
        host = next(self.batches)
        state = (self.loader.state_dict(), self.loader.skipped, self.loader.samples_seen)
        if self.stream is None:
            return self.transfer(host), state
        with torch.cuda.stream(self.stream):
            return self.transfer(host), state

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.exhausted:
            raise StopIteration
        batch, state = self.ahead if self.ahead is not None else self._fetch()
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for value in batch.values():
                value.record_stream(compute)  # the allocator must not reuse it before the step is done
        self.consumed = state
        try:
            self.ahead = self._fetch()  # start copying the next batch while this one is used
        except StopIteration:
            self.ahead, self.exhausted = None, True
        return batch

    def state_dict(self) -> dict:
        return self.consumed[0]

    @property
    def skipped(self) -> int:
        return self.consumed[1]

    @property
    def samples_seen(self) -> int:
        return self.consumed[2]
