"""Training-step throughput: img/s, tokens/s, MFU and peak memory per model x method x backend.

    python -m benchmarks.step_throughput                                   # the full table, one GPU
    python -m benchmarks.step_throughput --models vit_l16 --methods mae full --compile inductor
    python -m benchmarks.step_throughput --tiny                            # CPU smoke test, same code path

Backends: `plain` is the same method, optimizer and step in plain PyTorch (fp32 weights, bf16
autocast on GPU, fused AdamW, no DeepSpeed); `zero1`, `zero2`, `zero3` are the project's engine
(`train.engine.build_engine`: DeepSpeed bf16 with ds_configs/zeroN.json) doing the engine's step.
Methods: `mae` (the paper's recipe: mask 0.75, 8 x 512 decoder), `full` (a full-token step: the
encoder on every patch token, mean-pooled linear head, cross-entropy; the per-view student pass of
MoCo-v3/DINO/SimCLR and the compute of supervised ViT training), or any registered method name.

Every cell runs in its own process on synthetic device batches (the data path has its own
benchmark), so memory statistics are clean and an out-of-memory cell does not end the table.
MFU counts 3x the forward FLOPs of the method (`flops_per_image`) against the GPU's dense bf16
peak (`train.monitor.BF16_PEAK_FLOPS`). `syncs/step` counts host-device synchronisations that
`torch.cuda.set_sync_debug_mode` reports in steady-state steps (GPU only).
"""

import argparse
import json
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.batch import synthetic_batch
from train.distributed import init_distributed
from train.engine import build_engine, use_bf16
from train.methods import METHODS, Method, build_method
from train.models.vit import ViTEncoder
from train.monitor import gpu_peak_flops
from train.optim import make_optimizer, param_groups, peak_lr
from train.recipe import load_config
from train.speed import compile_blocks, enable_fast_kernels

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # embed_dim, depth, num_heads, patch_size, img_size
    "vit_b16": (768, 12, 12, 16, 224),
    "vit_l16": (1024, 24, 16, 16, 224),
    "vit_h14": (1280, 32, 16, 14, 224),
    "tiny": (64, 2, 2, 4, 32),
}
BATCH = {"mae": 256, "full": {"vit_b16": 256, "vit_l16": 128, "vit_h14": 64}}  # per GPU, defaults
BACKENDS = ("plain", "zero1", "zero2", "zero3")
REFERENCE_MAE_VIT_L = 1973.0  # img/s: eager PyTorch + timm, B=256, mask 0.75, 8x512 decoder, one H100
RESULT = "RESULT "


def overrides_for(model: str, method: str, backend: str, batch_size: int, compile_backend: str,
                  grad_checkpointing: bool) -> list[str]:
    dim, depth, heads, patch, img = MODELS[model]
    out = [f"model.embed_dim={dim}", f"model.depth={depth}", f"model.num_heads={heads}", f"model.patch_size={patch}",
           f"model.img_size={img}", f"data.batch_size={batch_size}", "train.steps=1", f"model.grad_checkpointing="
           f"{str(grad_checkpointing).lower()}", "eval.at_end=false"]
    out.append("method.name=" + {"full": "full_token"}.get(method, method))
    if model == "tiny" and method == "mae":
        out += ["method.decoder_dim=32", "method.decoder_depth=1", "method.decoder_heads=2"]
    if method == "dino":  # 2 global crops + data.local_crops (8) local ones of data.local_size (96) px
        out.append("data.views=dino")
        if model == "tiny":
            out += ["data.local_size=8", "method.out_dim=64", "method.hidden_dim=32", "method.bottleneck_dim=16"]
    if backend != "plain":
        out.append(f"train.deepspeed=ds_configs/{backend}.json")
    if compile_backend and backend != "zero3":  # torch.compile cannot trace ZeRO-3's gathering hooks
        out.append(f"train.compile={compile_backend}")
    return out


@dataclass
class FullTokenConfig:
    name: str = "full_token"
    num_classes: int = 1000


class FullToken(Method):
    """The `full` workload: encoder on all patch tokens, linear head on their mean, cross-entropy on the labels."""

    Config = FullTokenConfig

    def __init__(self, cfg):
        super().__init__()
        self.encoder = ViTEncoder(cfg.model)
        self.head = nn.Linear(cfg.model.embed_dim, cfg.method.num_classes)

    def forward(self, batch, step=0):
        logits = self.head(self.encoder(batch["images"], pool="avg"))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        return loss, {"loss": loss.detach()}

    def flops_per_image(self, compression=None):
        return 3 * self.encoder.forward_flops(self.encoder.num_patches)

    def tokens_per_image(self, compression=None):
        return self.encoder.num_patches


def build_step(cfg, plain: bool, device: torch.device):
    """(step(batch, i) -> loss, the method module, the optimizer) for one configuration.

    `plain`: plain PyTorch (the same method, optimizer and step; bf16 autocast when the run is bf16);
    else the engine with the `train.deepspeed` config of `cfg`.
    """
    if plain:
        torch.manual_seed(cfg.run.seed)
        module = build_method(cfg).to(device)
        if cfg.train.compile:
            compile_blocks(module, cfg.train.compile)
        lr = peak_lr(cfg.optim.base_lr, cfg.data.batch_size)  # the engine's rule
        optimizer = make_optimizer(param_groups(module, cfg.optim.weight_decay), lr, cfg.optim.betas, cpu_offload=False)
        bf16 = use_bf16(cfg)

        def step(batch, i):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = module(batch, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(module, "on_step_end"):
                module.on_step_end(i + 1)
            return loss
        return step, module, optimizer
    engine, optimizer, *_ = build_engine(cfg, build_method, world_size=1)

    def step(batch, i):
        loss, _ = engine(batch, i)
        engine.backward(loss)
        engine.step()
        if hasattr(engine.module, "on_step_end"):
            engine.module.on_step_end(i + 1)
        return loss
    return step, engine.module, optimizer


def measure(overrides: list[str], plain: bool, steps: int, warmup: int) -> dict:
    """Time `steps` training steps after `warmup` ones for one configuration, in this process.

    `plain`: plain PyTorch; else the engine with the `train.deepspeed` config of `overrides`. The
    `full_token` workload must be in METHODS (the command line registers it).
    """
    cfg = load_config(None, overrides)
    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        enable_fast_kernels()
    step, module, _ = build_step(cfg, plain, device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    batch = synthetic_batch(cfg.data, cfg.model.img_size, device)
    torch.manual_seed(1)  # the same masking noise for every backend
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup):
        step(batch, i)
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(batch, i)
    sync()
    seconds = time.perf_counter() - start
    result = {"img_per_s": steps * cfg.data.batch_size / seconds, "loss": float(loss.detach()),
              "batch_size": cfg.data.batch_size, "tokens_per_image": module.tokens_per_image(),
              "flops_per_image": module.flops_per_image()}
    result["tokens_per_s"] = result["img_per_s"] * result["tokens_per_image"]
    peak = gpu_peak_flops()
    if peak:
        result["mfu"] = result["img_per_s"] * result["flops_per_image"] / peak
    if cuda:
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu"] = torch.cuda.get_device_name()
        audit = 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            for i in range(audit):
                step(batch, warmup + steps + i)
            torch.cuda.set_sync_debug_mode("default")
            sync()
        result["syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught) / audit
    return result


def run_cell(model, method, backend, args, timeout: float | None = None) -> dict:
    """One measurement in a fresh process; an error (e.g. out of memory, over `timeout` s) becomes the cell's text."""
    batch = args.batch_size or (BATCH[method] if method == "mae" else BATCH["full"].get(model, 64))
    if model == "tiny":
        batch = args.batch_size or 16
    cell = {"model": model, "method": method, "backend": backend, "batch_size": batch}
    overrides = overrides_for(model, method, backend, batch, args.compile, args.grad_checkpointing)
    spec = json.dumps({"overrides": overrides, "plain": backend == "plain"})
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.step_throughput", "--cell", spec,
                               "--steps", str(args.steps), "--warmup", str(args.warmup)],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode == 0 and lines:
        return {**cell, **json.loads(lines[-1][len(RESULT):])}
    err = proc.stderr.strip().splitlines()
    oom = any("OutOfMemoryError" in line or "out of memory" in line for line in err)
    return {**cell, "error": "OOM" if oom else (err[-1] if err else f"exit {proc.returncode}")}


def table(results: list[dict]) -> str:
    plain = {(r["model"], r["method"]): r.get("img_per_s") for r in results if r["backend"] == "plain"}
    head = ["model", "method", "backend", "batch", "img/s", "tokens/s", "MFU", "peak GiB", "vs plain", "syncs/step"]
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["method"], r["backend"], str(r["batch_size"]), r["error"][:60]])
            continue
        base = plain.get((r["model"], r["method"]))
        rows.append([r["model"], r["method"], r["backend"], str(r["batch_size"]), f"{r['img_per_s']:.1f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.3f}" if "mfu" in r else "-",
                     f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-",
                     f"{r['img_per_s'] / base:.3f}" if base else "-",
                     f"{r['syncs_per_step']:g}" if "syncs_per_step" in r else "-"])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def target_checks(results: list[dict]) -> list[str]:
    """The issue's targets on one H100, for the cells that were measured."""
    ok = {(r["model"], r["method"], r["backend"]): r for r in results if "error" not in r}
    lines = []
    for (model, method, backend), r in ok.items():
        base = ok.get((model, method, "plain"))
        if backend in ("zero1", "zero2") and base:
            overhead = 1 - r["img_per_s"] / base["img_per_s"]
            lines.append(f"{'PASS' if overhead <= 0.05 else 'FAIL'} engine overhead {model} {method} {backend}: "
                         f"{overhead:+.1%} (target <= 5%)")
    mae_l = [r["img_per_s"] for (m, meth, b), r in ok.items() if (m, meth) == ("vit_l16", "mae") and b != "plain"]
    if mae_l:
        best = max(mae_l)
        lines.append(f"{'PASS' if best >= 1.3 * REFERENCE_MAE_VIT_L else 'FAIL'} MAE ViT-L engine {best:.0f} img/s = "
                     f"{best / REFERENCE_MAE_VIT_L:.2f}x the reference {REFERENCE_MAE_VIT_L:.0f} (target >= 1.3x)")
    full_l = [r["mfu"] for (m, meth, b), r in ok.items() if (m, meth) == ("vit_l16", "full") and "mfu" in r
              and b != "plain"]
    if full_l:
        lines.append(f"{'PASS' if max(full_l) >= 0.55 else 'FAIL'} full-token ViT-L engine MFU {max(full_l):.3f} "
                     "(target >= 0.55)")
    z3, base = ok.get(("vit_l16", "full", "zero3")), ok.get(("vit_l16", "full", "plain"))
    if z3 and base:
        ratio = z3["img_per_s"] / base["img_per_s"]
        lines.append(f"{'PASS' if ratio >= 0.9 else 'FAIL'} ZeRO-3 full-token vit_l16 {ratio:.3f}x plain "
                     "(target >= 0.9x)")
    dino = [r["img_per_s"] for (m, meth, b), r in ok.items() if (m, meth) == ("vit_l16", "dino")]
    if dino:
        lines.append(f"{'PASS' if max(dino) >= 300 else 'FAIL'} DINO ViT-L/16 (2x224 + 8x96) {max(dino):.0f} img/s "
                     "per GPU (target >= 300)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_b16", "vit_l16", "vit_h14"], choices=sorted(MODELS))
    parser.add_argument("--methods", nargs="+", default=["mae", "full"])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--batch-size", type=int, default=0, help="per GPU; 0: 256 for MAE, 256/128/64 full-token")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", default="", help="torch.compile backend for the blocks (inductor); not ZeRO-3")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the tiny model only (CPU smoke test)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: measure one cell (JSON: overrides, plain)
    args = parser.parse_args(argv)
    if args.cell:
        METHODS.setdefault("full_token", FullToken)
        spec = json.loads(args.cell)
        print(RESULT + json.dumps(measure(spec["overrides"], spec["plain"], args.steps, args.warmup)), flush=True)
        return 0
    models = ["tiny"] if args.tiny else args.models
    results = []
    for model in models:
        for method in args.methods:
            for backend in args.backends:
                results.append(run_cell(model, method, backend, args))
                print(f"{model} {method} {backend}: " + (results[-1].get("error") or
                      f"{results[-1]['img_per_s']:.1f} img/s"), file=sys.stderr, flush=True)
    print(table(results))
    for line in target_checks(results) if any("mfu" in r for r in results) else []:
        print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
