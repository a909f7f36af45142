"""One GPU proof: every GPU-only path checked and the performance table measured, in one command.

    bash benchmarks/gpu_proof.sh WHEEL_DIR OUT_DIR            # one GPU, no network: install, check, measure
    python -m benchmarks.gpu_proof --out OUT_DIR [--cpu] [--budget SECONDS] [--parts NAME ...]

Writes OUT_DIR/gpu_proof.json (every part: its numbers, its checks, or its error or the reason it was
skipped), OUT_DIR/gpu_proof.md (the table, targets beside the numbers, PASS/FAIL),
OUT_DIR/gpu_proof.log (everything the parts printed) and OUT_DIR/step_cells.json (the step cells, for
`python -m benchmarks.scaling_estimate --results`), rewritten after each part. Each part runs in
its own process under its own time limit, so an error, an out-of-memory or a hang is recorded and
the next part runs; a part is skipped, with the reason, when less of the budget is left than it
needs. `--cpu` runs the same parts on the CPU at tiny sizes (CI runs it; its numbers mean nothing).

Correctness first, then performance. Budget on one H100/H200 (estimates from FLOPs at the reference
rates: 790 TFLOP/s bf16 matmul, MAE ViT-L/16 B=256 1,973 img/s eager, full-token ViT-L/16 B=128
872 img/s eager; a fresh process with torch + timm + DeepSpeed and a built model costs ~8 s):

  part          what                                                               estimate s  limit s
  zero_stages   ViT-B/16 MAE B=32, 20 steps: fp32 plain PyTorch, bf16 ZeRO-1/2/3           35        70
  compile       ViT-L/16 MAE B=256 ZeRO-1, 8 steps eager + 8 with inductor blocks          80       130
                (compiling ~60 s; it fills the inductor cache the compiled cell reuses)
  gpu_decode    64 JPEGs decoded + cropped on the GPU vs the CPU path; 10 steps of          25        60
                ViT-B MAE with data.decode=gpu
  methods       8 methods + compressed MAE / MoCo v3, 5 bf16 steps, ViT 192-d x 4, 112px   50       100
  mae_*         ViT-L/16 MAE B=256 plain / ZeRO-1 / ZeRO-2 (~2,000 img/s: 0.13 s/step)    3 x 10    60 each
  mae_compiled  the faster of ZeRO-1/2 with inductor blocks (cache warm)                    25        90
  full_*        ViT-L/16 full token B=128 plain / ZeRO-1/2/3 (~870 img/s: 0.15 s/step)    4 x 11    60 each
  h14_*         ViT-H/14 full token B=64 + checkpointing, plain / ZeRO-3 (~0.2 s/step)    2 x 12    60 each
  dino_zero1    DINO ViT-L/16 2x224 + 8x96, B=64 (~1.5 TFLOP/img: ~0.23 s/step)             12        60
  compression   MoCo v3 ViT-L/16 B=64, keep 1/0.5/0.25 x patch scale 1/1.5/2, 2+5 steps    25        60
  data_path     GPU decode, 14 workers, end to end (8 s) and the device side alone          25        50
  pretrain      python -m train.pretrain, MAE ViT-B/16 B=256, 300 steps, 14 workers          50       100
                (~13 s of compute at ~6,000 img/s; slower if the data path cannot keep up)

Step cells: 3 warmup + 10 timed + 2 audited (syncs) steps, each in a fresh step_throughput process.

Total ~445 s of the default 450 s budget, plus ~15 s of offline install: 8 minutes.
"""

import argparse
import json
import math
import os
import selectors
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import timm
import torch

from benchmarks.compression import time_steps
from benchmarks.data_throughput import device_side, loader, make_shards, rate
from benchmarks.step_throughput import MODELS, build_step, overrides_for, run_cell, target_checks
from data_pipeline.augment import DeviceSingleView, SingleView, decode_image
from data_pipeline.batch import synthetic_batch
from data_pipeline.stream import StreamLoader, to_device
from train.compression import Setting
from train.distributed import init_distributed
from train.engine import train, use_bf16
from train.methods import build_method
from train.optim import make_optimizer, param_groups
from train.recipe import load_config
from train.speed import enable_fast_kernels

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# tolerances of the correctness checks (relative per-step loss differences, max over the steps)
ZERO_STAGE_RTOL = 0.01  # bf16 ZeRO-1/2/3 against each other: same math, other reduction order / partitioning
FP32_RTOL = 0.03  # bf16 engine against the fp32 plain-PyTorch run (bf16 has 8 bits of mantissa)
COMPILE_RTOL = 0.01  # inductor blocks against eager blocks, both bf16
# GPU decode against the CPU path (PIL), uint8 levels: nvjpeg's IDCT / chroma upsampling and torch's
# bicubic antialiasing round differently from libjpeg / PIL; a wrong crop or flip gives ~30 or more
DECODE_MEAN_TOL, DECODE_P99_TOL, DECODE_OTHER_SEED_MIN = 2.0, 16.0, 10.0
DATA_FACTOR, COMPRESSION_TOL = 3.0, 0.10


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------- sizes

class Sizes:
    """The part sizes of one mode: the GPU's (the numbers the table is for) or tiny CPU stand-ins."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.device = "cpu" if cpu else "cuda"
        # checks: (overrides of a MAE ViT) and steps
        self.vit_b = (["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
                       "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                       "method.decoder_heads=2"] if cpu else [])  # ViT-B/16 with MAE's 8 x 512 decoder
        self.check_batch = 8 if cpu else 32
        self.check_steps = 4 if cpu else 20
        self.compile_backend = "aot_eager" if cpu else "inductor"
        self.compile_model = "tiny" if cpu else "vit_l16"
        self.compile_batch = 8 if cpu else 256
        self.compile_steps = 3 if cpu else 8
        self.small = (["model.img_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
                       "model.num_heads=2", "data.batch_size=8"] if cpu else
                      ["model.img_size=112", "model.patch_size=16", "model.embed_dim=192", "model.depth=4",
                       "model.num_heads=3", "data.batch_size=32"])
        self.head = 16 if cpu else 64  # method projection sizes on the small ViT
        self.decoder = (["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"] if cpu else
                        ["method.decoder_dim=128", "method.decoder_depth=2", "method.decoder_heads=4"])
        self.local_size = 8 if cpu else 48
        self.workers = 0 if cpu else 4
        # data
        self.images, self.per_shard, self.source = (48, 12, (160, 120)) if cpu else (512, 64, (500, 375))
        self.decode_samples = 8 if cpu else 64
        self.img = 32 if cpu else 224
        self.loader_workers = 1 if cpu else 14
        self.data_seconds = 1.0 if cpu else 8.0
        # performance
        self.cell_steps, self.cell_warmup = (1, 1) if cpu else (10, 3)
        self.comp_model, self.comp_batch, self.comp_steps, self.comp_warmup = ("tiny", 4, 1, 1) if cpu else \
            ("vit_l16", 64, 5, 2)
        self.pretrain = (["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
                          "model.num_heads=2", "method.decoder_dim=32", "method.decoder_depth=1",
                          "method.decoder_heads=2", "data.batch_size=8", "data.workers=1", "train.steps=6",
                          "run.log_every=2"] if cpu else
                         ["data.batch_size=256", "data.workers=14", "train.steps=300", "run.log_every=50"])

    def model(self, name: str) -> str:
        """The step_throughput model a cell runs on: the named one, or `tiny` in CPU mode."""
        return "tiny" if self.cpu else name


# ---------------------------------------------------------------------------------------------- helpers

def shards(work: Path, sizes: Sizes) -> tuple[list[str], Path]:
    """Synthetic ImageNet-like JPEG shards (benchmarks.data_throughput's), written once into `work`."""

    urls, _ = make_shards(work / "shards", sizes.images, sizes.per_shard, sizes.source)
    return urls, Path(urls[0]).parent / "train.json"


def jpeg_batches(work: Path, sizes: Sizes, cfg, count: int, device) -> list[dict]:
    """`count` normalised single-view batches of real JPEG crops (CPU decode, seeded), on `device`."""

    urls, _ = shards(work, sizes)
    loader = StreamLoader(urls, SingleView(cfg.model.img_size), cfg.data.batch_size, seed=0, shuffle_buffer=64,
                          workers=sizes.workers)
    return [to_device(b, device, cfg.data.mean, cfg.data.std) for _, b in zip(range(count), loader)]


def loss_curve(overrides: list[str], plain: bool, batches: list[dict], steps: int, fp32_exact: bool = False):
    """Per-step losses of `steps` training steps on `batches` (cycled), the same masking noise for every run."""


    cfg = load_config(None, overrides)
    device = batches[0]["images"].device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not fp32_exact
    step, module, _ = build_step(cfg, plain, device)
    torch.manual_seed(1)
    out = [step(batches[i % len(batches)], i).item() for i in range(steps)]
    del step, module
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b))


def check(ok: bool, text: str) -> str:
    return f"{'PASS' if ok else 'FAIL'} {text}"


def save_progress(work: Path, part: str, result: dict) -> None:
    """What a part has so far: kept, with the error, if the part then fails or runs out of time."""
    (work / f"{part}.json").write_text(json.dumps(result))


def read_metrics(out_dir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


# ---------------------------------------------------------------------------------------------- correctness

def part_zero_stages(work: Path, sizes: Sizes, done: dict) -> dict:
    """MAE: bf16 engine under ZeRO-1/2/3 vs each other and vs an fp32 plain-PyTorch run, on real JPEG batches."""


    init_distributed()
    base = sizes.vit_b + [f"data.batch_size={sizes.check_batch}", "train.steps=1", "eval.at_end=false"]
    cfg = load_config(None, base)
    batches = jpeg_batches(work, sizes, cfg, sizes.check_steps, torch.device(sizes.device))
    curves = {"fp32_plain": loss_curve(base + ["train.precision=fp32"], True, batches, sizes.check_steps, True)}
    for stage in (1, 2, 3):  # ZeRO-3 last: it patches torch functions for the rest of the process
        curves[f"bf16_zero{stage}"] = loss_curve(base + ["train.precision=bf16",
                                                         f"train.deepspeed=ds_configs/zero{stage}.json"],
                                                 False, batches, sizes.check_steps)
    checks = []
    for stage in (2, 3):
        d = max_rel(curves[f"bf16_zero{stage}"], curves["bf16_zero1"])
        checks.append(check(d <= ZERO_STAGE_RTOL, f"MAE bf16 ZeRO-{stage} vs ZeRO-1 loss curve: max rel diff {d:.4f} "
                            f"(target <= {ZERO_STAGE_RTOL})"))
    for stage in (1, 2, 3):
        d = max_rel(curves[f"bf16_zero{stage}"], curves["fp32_plain"])
        checks.append(check(d <= FP32_RTOL, f"MAE bf16 ZeRO-{stage} vs fp32 plain PyTorch: max rel diff {d:.4f} "
                            f"(target <= {FP32_RTOL})"))
    first, last = curves["fp32_plain"][0], curves["fp32_plain"][-1]
    return {"curves": curves, "checks": checks, "summary": f"fp32 loss {first:.4f} -> {last:.4f}"}


def part_compile(work: Path, sizes: Sizes, done: dict) -> dict:
    """torch.compile of the blocks gives the eager losses: MAE under ZeRO-1 (the compiled cell's setting)."""


    init_distributed()
    base = overrides_for(sizes.compile_model, "mae", "zero1", sizes.compile_batch, "", False)
    batches = jpeg_batches(work, sizes, load_config(None, base), 4, torch.device(sizes.device))
    eager = loss_curve(base, False, batches, sizes.compile_steps)
    start = time.perf_counter()
    compiled = loss_curve(base + [f"train.compile={sizes.compile_backend}"], False, batches, sizes.compile_steps)
    seconds = time.perf_counter() - start
    d = max_rel(compiled, eager)
    return {"eager": eager, "compiled": compiled, "compile_run_s": seconds,
            "checks": [check(d <= COMPILE_RTOL, f"MAE {sizes.compile_backend} blocks vs eager losses: max rel diff "
                             f"{d:.4f} (target <= {COMPILE_RTOL})")],
            "summary": f"compiled run incl. compilation {seconds:.0f} s"}


def part_gpu_decode(work: Path, sizes: Sizes, done: dict) -> dict:
    """The device decode path (data.decode=gpu) gives the CPU path's crops, and trains."""



    urls, manifest = shards(work, sizes)
    samples = []
    with tarfile.open(urls[0]) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                samples.append({"__key__": member.name, "jpg": tar.extractfile(member).read()})
            if len(samples) == sizes.decode_samples:
                break
    device = torch.device(sizes.device)

    def views(seed: int):
        cpu, dev = SingleView(sizes.img), DeviceSingleView(sizes.img)
        cpu_images, packed = [], []
        for i, sample in enumerate(samples):
            torch.manual_seed(seed + i)
            cpu_images.append(cpu(decode_image(sample))["images"])
            torch.manual_seed(seed + i)
            packed.append({**dev.from_sample(sample), "labels": i})
        batch = dev.to_device(dev.collate(packed), device, MEAN, STD)
        mean, std = torch.tensor(MEAN, device=device).view(3, 1, 1), torch.tensor(STD, device=device).view(3, 1, 1)
        return torch.stack(cpu_images).float(), ((batch["images"] * std + mean) * 255).cpu(), batch["_skipped"]

    cpu, dev, skipped = views(seed=0)
    diff = (dev - cpu).abs()
    other = (views(seed=1)[1] - cpu).abs().mean().item()
    ranked = diff.flatten().sort().values
    mean_diff, p99 = diff.mean().item(), ranked[int(0.99 * (len(ranked) - 1))].item()
    checks = [check(mean_diff <= DECODE_MEAN_TOL and p99 <= DECODE_P99_TOL and skipped == 0,
                    f"GPU decode vs CPU path, {len(samples)} JPEGs at {sizes.img}px: mean |diff| {mean_diff:.2f}, "
                    f"p99 {p99:.1f} levels, max {diff.max().item():.0f}, {skipped} skipped "
                    f"(target mean <= {DECODE_MEAN_TOL}, p99 <= {DECODE_P99_TOL}, 0 skipped)"),
              check(other >= DECODE_OTHER_SEED_MIN, f"GPU decode with other crop seeds differs: mean |diff| "
                    f"{other:.1f} (target >= {DECODE_OTHER_SEED_MIN}, so the comparison above is not trivially true)")]
    out = work / "decode_train"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, sizes.vit_b + [f"data.train={manifest}", "data.decode=gpu", f"run.output_dir={out}",
                                           f"data.batch_size={sizes.check_batch}", f"data.workers={sizes.workers}",
                                           "train.steps=10", "run.log_every=1", "eval.at_end=false"])
    train(cfg, build_method)
    rows = read_metrics(out)
    losses = [rows[s]["train/loss"] for s in sorted(rows)]
    skipped_train = rows[max(rows)]["data/skipped"]
    checks.append(check(all(math.isfinite(x) for x in losses) and skipped_train == 0,
                        f"MAE trains with data.decode=gpu: {len(losses)} steps, loss {losses[0]:.3f} -> "
                        f"{losses[-1]:.3f}, {skipped_train:.0f} skipped (target finite, 0 skipped)"))
    return {"mean_diff": mean_diff, "p99_diff": p99, "other_seed_diff": other, "train_losses": losses,
            "checks": checks, "summary": f"mean |diff| {mean_diff:.2f} levels"}


def method_runs(work: Path, sizes: Sizes, manifest: Path) -> dict[str, list[str]]:
    """The overrides of each method's 5-step bf16 run on the small ViT (teachers: random tiny CLIP towers)."""

    img, patch = (16, 4) if sizes.cpu else (112, 16)
    tower = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=img, patch_size=patch,
                              embed_dim=32, depth=2, num_heads=2, num_classes=24)
    teacher = work / "teacher.pt"
    torch.save(tower.state_dict(), teacher)
    codebook = work / "kclip16.pt"
    torch.save({"centroids": torch.randn(16, 24),
                "teacher": {"model": "vit_base_patch16_clip_224", "img_size": 0, "project": True}}, codebook)
    h, teach = sizes.head, [f"method.teacher.path={teacher}", "method.teacher.num_heads=2"]
    runs = {
        "mae": ["method.name=mae"] + sizes.decoder,
        "hpm": ["method.name=hpm"] + sizes.decoder,
        "mapet": ["method.name=mapet", f"method.codebook={codebook}", "method.num_codes=16",
                  f"method.num_visible={4 if sizes.cpu else 12}"] + teach,
        "digpt": ["method.name=digpt"] + sizes.decoder + teach,
        "mlo_mae": ["method.name=mlo_mae", "method.mask_net_dim=16", "method.mask_net_depth=1",
                    "method.mask_net_heads=2", "method.hyper_every=1"] + sizes.decoder,
        "moco_v3": ["method.name=moco_v3", "data.views=moco_v3", f"method.proj_dim={h}", f"method.mlp_dim={4 * h}"],
        "dino": ["method.name=dino", "data.views=dino", "data.local_crops=2", f"data.local_size={sizes.local_size}",
                 f"method.out_dim={16 * h}", f"method.hidden_dim={4 * h}", f"method.bottleneck_dim={h}"],
        "simclr": ["method.name=simclr", "data.views=simclr", f"method.proj_hidden_dim={4 * h}",
                   f"method.proj_dim={h}"],
    }
    runs["mae_compressed"] = ["--config", "train/configs/compression/mae.yaml"] + runs["mae"]
    runs["moco_v3_compressed"] = ["--config", "train/configs/compression/moco_v3.yaml"] + runs["moco_v3"]
    return runs


def part_methods(work: Path, sizes: Sizes, done: dict) -> dict:
    """Every method (and a compressed MAE and MoCo v3) runs 5 bf16 engine steps with finite losses."""

    _, manifest = shards(work, sizes)
    base = sizes.small + [f"data.train={manifest}", f"data.workers={sizes.workers}", "train.steps=5",
                          "train.precision=bf16", "run.log_every=1", "eval.at_end=false", "optim.warmup_steps=1"]
    result, checks = {}, []
    for name, overrides in method_runs(work, sizes, manifest).items():
        configs = [overrides[i + 1] for i, o in enumerate(overrides) if o == "--config"]
        dotted = [o for i, o in enumerate(overrides) if o != "--config" and (i == 0 or overrides[i - 1] != "--config")]
        out = work / f"method_{name}"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        try:
            train(load_config(configs or None, base + dotted + [f"run.output_dir={out}"]), build_method)
            rows = read_metrics(out)
            losses = [rows[s]["train/loss"] for s in sorted(rows)]
            result[name] = {"losses": losses, "seconds": time.perf_counter() - start}
            ok = len(losses) == 5 and all(math.isfinite(x) for x in losses)
            checks.append(check(ok, f"{name} 5 bf16 steps: losses {', '.join(f'{x:.3f}' for x in losses)} "
                                "(target 5 finite)"))
        except Exception as err:  # one method's failure is recorded; the others still run
            traceback.print_exc()
            result[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            checks.append(f"FAIL {name} 5 bf16 steps: {type(err).__name__}: {str(err)[:150]}")
        log(checks[-1])
        save_progress(work, "methods", {"runs": result, "checks": checks})
    return {"runs": result, "checks": checks,
            "summary": f"{sum(c.startswith('PASS') for c in checks)}/{len(checks)} methods finite"}


# ---------------------------------------------------------------------------------------------- performance

# the step_throughput cells: (name, model, method, backend, batch, grad checkpointing); "compiled" picks
# the faster eager ZeRO stage of the MAE ViT-L cells measured before it
CELLS = [("mae_plain", "vit_l16", "mae", "plain", 256, False), ("mae_zero1", "vit_l16", "mae", "zero1", 256, False),
         ("mae_zero2", "vit_l16", "mae", "zero2", 256, False), ("mae_compiled", "vit_l16", "mae", "best", 256, False),
         ("full_plain", "vit_l16", "full", "plain", 128, False), ("full_zero1", "vit_l16", "full", "zero1", 128, False),
         ("full_zero2", "vit_l16", "full", "zero2", 128, False), ("full_zero3", "vit_l16", "full", "zero3", 128, False),
         ("h14_plain", "vit_h14", "full", "plain", 64, True), ("h14_zero3", "vit_h14", "full", "zero3", 64, True),
         ("dino_zero1", "vit_l16", "dino", "zero1", 64, False)]
CELL_NAMES = {spec[0] for spec in CELLS}
# CPU mode: one cell per code path (plain, engine, compile of the best stage, ZeRO-3 full token, DINO views);
# the others differ from these only in sizes and numbers the CPU cannot give
CPU_CELLS = {"mae_zero2": "mae_zero1", "full_plain": "mae_plain", "full_zero1": "mae_zero1",
             "full_zero2": "mae_zero1", "h14_plain": "mae_plain", "h14_zero3": "full_zero3"}


def run_step_cell(spec, sizes: Sizes, done: dict, timeout: float) -> dict:
    """One benchmarks.step_throughput cell in its own process, labelled with the GPU model it stands for."""

    name, model, method, backend, batch, ckpt = spec
    compile_backend = ""
    if backend == "best":
        rates = {b: done.get(f"mae_{b}", {}).get("img_per_s", 0.0) for b in ("zero1", "zero2")}
        backend, compile_backend = max(rates, key=rates.get), sizes.compile_backend
    args = argparse.Namespace(batch_size=4 if sizes.cpu else batch, compile=compile_backend, grad_checkpointing=ckpt,
                              steps=sizes.cell_steps, warmup=sizes.cell_warmup)
    cell = run_cell(sizes.model(model), method, backend, args, timeout=timeout)
    cell.update(model=model, compile=compile_backend or None)  # CPU mode: the tiny stand-in keeps the GPU name
    if "error" in cell:
        raise RuntimeError(cell["error"])
    return cell


def cell_checks(done: dict) -> list[str]:
    """benchmarks.step_throughput's targets over the measured cells (the compiled one counts as MAE ViT-L)."""

    cells = [{**c, "backend": c["backend"] + ("+compile" if c.get("compile") else "")}
             for name, c in done.items() if name in CELL_NAMES and "img_per_s" in c]
    return target_checks(cells)


def part_compression(work: Path, sizes: Sizes, done: dict) -> dict:
    """Step-time ratios of compressed MoCo v3 steps (keep 1/0.5/0.25 x patch scale 1/1.5/2) vs the FLOPs model."""


    dim, depth, heads, patch, img = MODELS[sizes.comp_model]
    cfg = load_config(None, [f"model.embed_dim={dim}", f"model.depth={depth}", f"model.num_heads={heads}",
                             f"model.patch_size={patch}", f"model.img_size={img}", "method.name=moco_v3",
                             "data.views=moco_v3", f"data.batch_size={sizes.comp_batch}", "train.steps=100"]
                      + (["method.mlp_dim=32", "method.proj_dim=16"] if sizes.cpu else []))
    device = torch.device(sizes.device)
    if device.type == "cuda":
        enable_fast_kernels()
    torch.manual_seed(0)
    method = build_method(cfg).to(device).train()
    optimizer = make_optimizer(param_groups(method, cfg.optim.weight_decay), 1e-4, cfg.optim.betas, cpu_offload=False)
    batch = synthetic_batch(cfg.data, cfg.model.img_size, device)
    bf16 = use_bf16(cfg)
    rows, checks = [], []
    full = None
    for scale in (1.0, 1.5, 2.0):
        for keep in (1.0, 0.5, 0.25):
            setting = Setting(None if scale == 1.0 else round(patch * scale), keep)
            seconds = time_steps(method, optimizer, batch, setting, sizes.comp_steps, sizes.comp_warmup, bf16)
            flops = method.flops_per_image(compression=setting)
            full = full or (seconds, flops)
            row = {"patch_scale": scale, "keep_ratio": keep, "tokens": method.tokens_per_image(compression=setting),
                   "ms_per_step": 1e3 * seconds, "time_ratio": seconds / full[0], "flops_ratio": flops / full[1]}
            rows.append(row)
            if setting.is_full:
                continue
            err = row["time_ratio"] / row["flops_ratio"] - 1
            checks.append(check(abs(err) <= COMPRESSION_TOL, f"MoCo v3 ViT-L step time, patch x{scale:g} keep "
                                f"{keep:g}: {row['time_ratio']:.3f} of full vs FLOPs model {row['flops_ratio']:.3f} "
                                f"({err:+.1%}, target within {COMPRESSION_TOL:.0%})"))
    return {"rows": rows, "checks": checks, "summary": f"{len(rows)} settings, full {rows[0]['ms_per_step']:.1f} ms"}


def mae_step_rate(done: dict) -> tuple[float, str]:
    """The MAE ViT-L engine rate the data path must feed 3x over: the best measured, else the target."""
    rates = [c["img_per_s"] for n, c in done.items() if n.startswith("mae_") and n != "mae_plain" and "img_per_s" in c]
    return (max(rates), "measured") if rates else (2600.0, "the target, not measured here")


def part_data_path(work: Path, sizes: Sizes, done: dict) -> dict:
    """The GPU decode path end to end (workers read bytes and draw crops, nvjpeg decodes): img/s vs 3x the MAE rate."""
    urls, _ = shards(work, sizes)
    args = argparse.Namespace(batch_size=8 if sizes.cpu else 256, shuffle_buffer=256, img_size=sizes.img,
                              seconds=sizes.data_seconds, warmup=3)
    device = torch.device(sizes.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    side = device_side(urls, DeviceSingleView(sizes.img), args, device)
    end_to_end, _ = rate(loader(urls, DeviceSingleView(sizes.img), args, sizes.loader_workers, device),
                         args.batch_size, args.seconds, args.warmup, sync)
    step_rate, basis = mae_step_rate(done)
    checks = [check(end_to_end >= DATA_FACTOR * step_rate,
                    f"data path, GPU decode, {sizes.loader_workers} workers: {end_to_end:.0f} img/s = "
                    f"{end_to_end / step_rate:.2f}x the MAE ViT-L step rate {step_rate:.0f} ({basis}) "
                    f"(target >= {DATA_FACTOR:g}x); device side alone {side:.0f} img/s")]
    return {"img_per_s": end_to_end, "device_side_img_per_s": side, "workers": sizes.loader_workers,
            "step_rate": step_rate, "checks": checks, "summary": f"{end_to_end:.0f} img/s"}


def part_pretrain(work: Path, sizes: Sizes, done: dict) -> dict:
    """A 300-step MAE ViT-B run of `python -m train.pretrain` on JPEG shards; img/s, MFU, data wait from its logs."""
    _, manifest = shards(work, sizes)
    out = work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "train.pretrain", f"data.train={manifest}", f"run.output_dir={out}",
           "eval.at_end=false", "run.ckpt_every=100000", "optim.warmup_steps=20"] + sizes.pretrain
    log(" ".join(cmd))
    subprocess.run(cmd, cwd=REPO, check=True)
    rows = read_metrics(out)
    steps = sorted(rows)
    timed = [rows[s] for s in steps[1:]] or [rows[steps[-1]]]  # the first window holds start-up
    img_s = sum(r["perf/img_per_s"] for r in timed) / len(timed)
    mfu = [r["perf/mfu"] for r in timed if "perf/mfu" in r]
    wait = sum(r["data/wait_fraction"] for r in timed) / len(timed)
    tb = list((out / "tb").glob("events.out.tfevents.*"))
    result = {"steps": steps[-1], "img_per_s": img_s, "mfu": sum(mfu) / len(mfu) if mfu else None,
              "data_wait_fraction": wait, "final_loss": rows[steps[-1]]["train/loss"], "tensorboard_files": len(tb)}
    result["checks"] = [check(bool(tb) and math.isfinite(result["final_loss"]),
                              f"train.pretrain MAE ViT-B {steps[-1]} steps: {img_s:.0f} img/s, MFU "
                              f"{result['mfu'] or 0:.3f}, data wait {wait:.1%}, loss {result['final_loss']:.3f}, "
                              f"{len(tb)} TensorBoard file(s) (target: runs, finite, logs)")]
    result["summary"] = f"{img_s:.0f} img/s, data wait {wait:.1%}"
    return result


PARTS = {"zero_stages": (part_zero_stages, 35, 70), "compile": (part_compile, 80, 130),
         "gpu_decode": (part_gpu_decode, 25, 60), "methods": (part_methods, 50, 100),
         **{spec[0]: (spec, 12, 60) for spec in CELLS},
         "compression": (part_compression, 25, 60), "data_path": (part_data_path, 25, 50),
         "pretrain": (part_pretrain, 50, 100)}
PARTS["mae_compiled"] = (PARTS["mae_compiled"][0], 25, 90)
CPU_LIMIT = 300  # seconds per part in CPU mode (the budget bounds the whole run)


# ---------------------------------------------------------------------------------------------- driver

def environment() -> dict:

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    for name in ("deepspeed", "timm", "torchvision", "webdataset"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


def run_part(name: str, work: Path, sizes: Sizes, done: dict, timeout: float, logfile) -> dict:
    """One part under `timeout` seconds; its result, or {"error": ...}. Step cells run in step_throughput's
    own process per cell; the other parts in a child process of this script."""
    target = PARTS[name][0]
    if isinstance(target, tuple):
        return run_step_cell(target, sizes, done, timeout)
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    (work / "done.json").write_text(json.dumps(done))
    cmd = [sys.executable, "-m", "benchmarks.gpu_proof", "--part", name, "--work", str(work)] + \
        (["--cpu"] if sizes.cpu else [])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tail: list[str] = []
    deadline = time.perf_counter() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    error = None
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            os.killpg(proc.pid, 9)
            error = f"TimeoutError: timed out after {timeout:.0f} s (last output: {tail[-1] if tail else '-'})"
            break
        if sel.select(timeout=min(left, 1.0)):
            line = proc.stdout.readline()
            if not line:
                break
            logfile.write(line)
            logfile.flush()
            if not any(noise in line for noise in ("FutureWarning", "warnings.warn")):
                print(f"    {line.rstrip()[:200]}", flush=True)
            tail = (tail + [line.strip()])[-5:]
    proc.wait()
    if error is None and proc.returncode != 0:
        errors = [t for t in tail if "Error" in t or "error" in t] or tail or [f"exit {proc.returncode}"]
        error = f"exit {proc.returncode}: {errors[-1][:300]}"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if error:  # with whatever the part had saved before it failed
        result["error"] = error
    return result


def status_of(result: dict) -> str:
    if "skipped" in result:
        return "SKIP"
    if "error" in result:
        return "ERROR"
    checks = result.get("checks", [])
    return "FAIL" if any(c.startswith("FAIL") for c in checks) else "PASS" if checks else "done"


def numbers(result: dict) -> str:
    if "img_per_s" in result and "batch_size" in result:  # a step cell
        mfu = f", MFU {result['mfu']:.3f}" if result.get("mfu") is not None else ""
        mem = f", {result['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in result else ""
        sync = f", {result['syncs_per_step']:g} syncs/step" if "syncs_per_step" in result else ""
        return (f"{result['model']} {result['method']} {result['backend']}{'+compile' if result.get('compile') else ''}"
                f" B={result['batch_size']}: {result['img_per_s']:.1f} img/s, {result['tokens_per_s']:.0f} tok/s"
                f"{mfu}{mem}{sync}")
    return result.get("summary") or result.get("error") or result.get("skipped") or ""


def write_report(out: Path, report: dict) -> None:
    """gpu_proof.json, gpu_proof.md and step_cells.json (the measured cells, for scaling_estimate --results)."""
    (out / "gpu_proof.json").write_text(json.dumps(report, indent=1))
    cells = [r for name, r in report["parts"].items() if name in CELL_NAMES and "img_per_s" in r]
    (out / "step_cells.json").write_text(json.dumps(cells, indent=1))
    env = report["environment"]
    mode = " (CPU mode: tiny sizes, the numbers mean nothing)" if report["cpu"] else ""
    lines = [f"# GPU proof: {env['device']}, {env['date_utc']} UTC{mode}",
             "", f"torch {env['torch']} (CUDA {env['cuda']}), DeepSpeed {env['deepspeed']}, timm {env['timm']}; "
             f"{report['elapsed_s']:.0f} s of the {report['budget_s']:.0f} s budget", "",
             "| part | status | s | numbers |", "|---|---|---|---|"]
    for name, r in report["parts"].items():
        lines.append(f"| {name} | {status_of(r)} | {r.get('seconds', 0):.0f} | {numbers(r).replace('|', '/')} |")
    lines += ["", "| check (target) | result |", "|---|---|"]
    for c in report["checks"]:
        status, text = c.split(" ", 1)
        lines.append(f"| {text.replace('|', '/')} | {status} |")
    (out / "gpu_proof.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_proof", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_proof.json / .md / .log")
    parser.add_argument("--cpu", action="store_true", help="the same parts on the CPU at tiny sizes")
    parser.add_argument("--budget", type=float, default=0, help="wall-clock seconds for all parts (450; CPU 100)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), help="run only these parts")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sizes = Sizes(args.cpu)
    if args.part:  # child: one part, its result as JSON in the work folder
        done = json.loads((args.work / "done.json").read_text())
        result = PARTS[args.part][0](args.work, sizes, done)
        (args.work / f"{args.part}.json").write_text(json.dumps(result))
        return 0
    if not args.out:
        parser.error("--out is required")

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_proof: no CUDA device; use --cpu for the CPU mode", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (100.0 if args.cpu else 450.0)
    work = Path(tempfile.mkdtemp(prefix="gpu_proof_"))
    start = time.perf_counter()
    report = {"cpu": args.cpu, "budget_s": budget, "environment": environment(), "parts": {}, "checks": []}
    done: dict = {}
    log(f"gpu proof on {report['environment']['device']}, budget {budget:.0f} s, work folder {work}")
    with open(args.out / "gpu_proof.log", "w") as logfile:
        for name in args.parts or list(PARTS):
            _, estimate, limit = PARTS[name]
            elapsed = time.perf_counter() - start
            left = budget - elapsed
            need = 5.0 if args.cpu else estimate
            if args.cpu and CPU_CELLS.get(name):
                result = {"skipped": f"CPU mode: the code path of {CPU_CELLS[name]}"}
            elif left < need:
                result = {"skipped": f"{left:.0f} s of the budget left, the part needs about {need:.0f} s"}
            else:
                log(f"[{elapsed:5.0f} s] {name} (limit {min(left, CPU_LIMIT if args.cpu else limit):.0f} s)")
                t0 = time.perf_counter()
                try:
                    result = run_part(name, work, sizes, done, min(left, CPU_LIMIT if args.cpu else limit), logfile)
                except Exception as err:
                    result = {"error": f"{type(err).__name__}: {err}"[:400]}
                result["seconds"] = time.perf_counter() - t0
            done[name] = result
            report["parts"][name] = result
            report["checks"] = [c for r in report["parts"].values() for c in r.get("checks", [])] + cell_checks(done)
            report["elapsed_s"] = time.perf_counter() - start
            write_report(args.out, report)
            log(f"[{report['elapsed_s']:5.0f} s] {name}: {status_of(result)} {numbers(result)}")
    shutil.rmtree(work, ignore_errors=True)
    log("\n" + (args.out / "gpu_proof.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
