"""The gradient error a compression setting causes: the engine's periodic diagnostic and the sweep behind
`python -m train.compression` (see the package docstring)."""

import math
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist

from train.compression import FULL, Setting, step_seed
from train.models.ema import gathered
from train.models.vit import patch_grid


def gradient_error(gradient: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative norm error |g - ref| / |ref|) of two flat gradients, in float64."""
    g, ref = gradient.double(), reference.double()
    cosine = float(g @ ref / (g.norm() * ref.norm()).clamp_min(1e-300))
    return cosine, float((g - ref).norm() / ref.norm().clamp_min(1e-300))


class GradientDiagnostic:
    """The gradient under a compression setting against the full-token gradient: same batch, weights and RNG.

    It runs on a plain fp32 copy of the method (built once by `build_copy`, weights copied from the
    live module, gathered under ZeRO-3) so DeepSpeed's partitioned gradients and optimizer state are
    never touched, under bf16 autocast when training is bf16. Each pass starts from the same global
    RNG state and restores it afterwards, so training continues exactly as without the diagnostic.
    With several ranks, every rank must call it: gradients are averaged over ranks (the gradient of
    the global batch) before they are compared.
    """

    def __init__(self, build_copy: Callable[[], torch.nn.Module], device: torch.device, bf16: bool = False,
                 model: torch.nn.Module | None = None, seed: int = 0):
        self.build_copy, self.device, self.bf16, self.seed = build_copy, device, bf16, seed
        self.model = model  # the plain copy (built by `build_copy` on first `load` when not given)

    def load(self, module: torch.nn.Module) -> torch.nn.Module:
        """The copy, holding `module`'s current weights and extra state (EMA teachers)."""
        if self.model is None:
            with self._fork_rng():  # building the copy must not move the training RNG
                self.model = self.build_copy().to(self.device).float().train()
        with gathered(list(module.parameters())):
            self.model.load_state_dict(module.state_dict())
        return self.model

    def _fork_rng(self):
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def gradient(self, batch: dict, step: int, setting: Setting, rng_seed: int | None = None):
        """(flat fp32 gradient averaged over ranks, loss) of the copy on `batch` under `setting`."""
        model = self.model
        model.zero_grad(set_to_none=True)
        with self._fork_rng():
            if rng_seed is not None:
                torch.manual_seed(rng_seed)
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                loss, _ = model({**batch, "compression": setting}, step)
            loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in params])
        model.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.cat([flat, loss.view(1)])
            dist.all_reduce(both)
            both /= dist.get_world_size()
            flat, loss = both[:-1], both[-1]
        return flat, float(loss)

    def __call__(self, module: torch.nn.Module, batch: dict, step: int, setting: Setting) -> dict[str, float]:
        """TensorBoard scalars: grad_cosine, grad_rel_error and both losses, for `setting` on `batch`."""
        batch = {k: v for k, v in batch.items() if k != "compression"}
        self.load(module)
        full, loss_full = self.gradient(batch, step, FULL)
        self.load(module)  # again: a forward may update state (DINO's centre), both passes start from the same
        compressed, loss_compressed = self.gradient(batch, step, setting)
        cosine, rel_error = gradient_error(compressed, full)
        return {"compression/grad_cosine": cosine, "compression/grad_rel_error": rel_error,
                "compression/loss_full": loss_full, "compression/loss_compressed": loss_compressed}


def relative_cost(method: torch.nn.Module, setting: Setting, img_size: int, patch_size: int) -> float:
    """Training cost of a step under `setting` relative to full tokens: the method's FLOPs model if it has
    one (`flops_per_image(compression=...)` not None), else the share of encoder tokens."""
    if method.flops_per_image() is not None:
        return method.flops_per_image(compression=setting) / method.flops_per_image()
    grid = patch_grid((img_size, img_size), setting.patch_size or patch_size)
    return setting.num_kept(grid[0] * grid[1]) / (img_size // patch_size) ** 2


def sweep(diagnostic: GradientDiagnostic, batches: list[dict], settings: list[Setting], step: int, costs: list[float],
          variance_scale: float = 1.0) -> list[dict]:
    """Gradient error of each setting against full tokens on the same `batches` (same weights, same RNG per batch).

    Per setting: mean cosine and relative error (per batch, against that batch's full-token gradient)
    and the paper's decomposition relative to |G|^2, G the mean full-token gradient:
    bias^2 = |E[g_s - g_full]|^2 (unbiased estimate), variance = E|g_s - E g_s|^2 scaled by
    `variance_scale` (sweep batch / training batch: variance falls as 1 / batch), and the
    cost-adjusted error CA = bias^2 + cost x variance (a budget buys 1 / cost times more compressed
    samples, which divides only the variance). The setting with the lowest CA is the best use of compute.
    """
    k = len(batches)
    rows = []
    for setting, cost in zip(settings, costs, strict=True):
        sums = {"full": 0.0, "s": 0.0, "d": 0.0}
        squares = {"s": 0.0, "d": 0.0}
        cosines, errors = [], []
        for b, batch in enumerate(batches):
            seed = step_seed(diagnostic.seed, 0, step, b)
            full, _ = diagnostic.gradient(batch, step, FULL, rng_seed=seed)
            compressed = full if setting.is_full else diagnostic.gradient(
                batch, step, replace(setting, seed=seed), rng_seed=seed)[0]
            cosine, error = gradient_error(compressed, full)
            cosines.append(cosine)
            errors.append(error)
            for key, g in (("full", full), ("s", compressed), ("d", compressed - full)):
                sums[key] = sums[key] + g
                if key in squares:
                    squares[key] += float(g.double().square().sum())
        g2 = float((sums["full"] / k).double().square().sum())
        mean_s2 = float((sums["s"] / k).double().square().sum())
        mean_d2 = float((sums["d"] / k).double().square().sum()) if not setting.is_full else 0.0
        if k > 1:
            variance = max(squares["s"] - k * mean_s2, 0.0) / (k - 1)
            bias2 = max(mean_d2 - max(squares["d"] - k * mean_d2, 0.0) / (k - 1) / k, 0.0)
        else:
            variance, bias2 = float("nan"), mean_d2
        variance *= variance_scale
        rows.append({"patch_size": setting.patch_size, "keep_ratio": setting.keep_ratio, "cost": cost,
                     "cosine": sum(cosines) / k, "rel_error": sum(errors) / k, "bias2": bias2 / g2,
                     "variance": variance / g2, "ca_error": (bias2 + cost * variance) / g2})
    return rows


def measured_cost(method: torch.nn.Module, batch: dict, settings: list[Setting], repeats: int = 3) -> list[float]:
    """Time of a forward + backward under each setting relative to full tokens (median of `repeats`)."""
    import time

    def seconds(setting: Setting) -> float:
        times = []
        for _ in range(repeats + 1):  # the first one warms up
            start = time.perf_counter()
            loss, _ = method({**batch, "compression": setting}, 0)
            loss.backward()
            method.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]

    with torch.random.fork_rng():
        full = seconds(FULL)
        return [seconds(s) / full for s in settings]


def best_setting(rows: list[dict]) -> int:
    """Index of the row with the lowest cost-adjusted error (what chooses a schedule; not the cosine)."""
    return min(range(len(rows)), key=lambda i: rows[i]["ca_error"] if math.isfinite(rows[i]["ca_error"]) else 1e300)


def format_table(rows: list[dict], patch_size: int, tokens: list[int]) -> str:
    """The sweep as a fixed-width table, the lowest cost-adjusted error marked with *."""
    best = best_setting(rows)
    lines = [f"{'patch':>5} {'keep':>5} {'tokens':>6} {'cost':>6} {'cosine':>7} {'rel_err':>7} {'bias2':>9} "
             f"{'cost*var':>9} {'CA_error':>9}"]
    for i, (r, t) in enumerate(zip(rows, tokens, strict=True)):
        lines.append(f"{r['patch_size'] or patch_size:>5} {r['keep_ratio']:>5.2f} {t:>6} {r['cost']:>6.3f} "
                     f"{r['cosine']:>7.4f} {r['rel_error']:>7.4f} {r['bias2']:>9.3e} {r['cost'] * r['variance']:>9.3e} "
                     f"{r['ca_error']:>9.3e}{' *' if i == best else ''}")
    return "\n".join(lines)
