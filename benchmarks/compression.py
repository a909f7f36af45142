"""What a compression schedule buys: per-step time by schedule stage, and a learning check.

    python -m benchmarks.compression speed --config RUN.yaml --config train/configs/compression/moco_v3.yaml
    python -m benchmarks.compression learn --config train/configs/mae_demo.yaml \
        --config train/configs/compression/mae.yaml

`speed` times full training steps (forward, backward, AdamW; bf16 autocast on GPU; synthetic batches of
the run's views, so the data pipeline is not measured) at the setting of each stage of the schedule and
at full tokens, and prints the expected wall-clock of the whole schedule against the uncompressed run
(a Riemann sum over `--points` equal stretches of training). One GPU, plain PyTorch: communication is
left out. `learn` trains the run twice from the same config, uncompressed and compressed, and prints
both wall-clocks (and the training process's CPU time, steadier on a shared machine) with the k-NN and
linear-probe accuracy of each encoder on data.val.
"""

import copy
import json
import logging
import statistics
import sys
import time

import torch

from data_pipeline.batch import synthetic_batch
from data_pipeline.shards import ensure_demo_shards
from train.cli import config_of, config_parser, run_command
from train.compression import FULL, CompressionSchedule, Setting
from train.config import CompressionConfig, ConfigError
from train.distributed import barrier, init_distributed
from train.engine import train, use_bf16
from train.eval.quick import evaluate_encoder
from train.methods import build_method
from train.optim import make_optimizer, param_groups

log = logging.getLogger("train")


def stage_settings(schedule: CompressionSchedule, points: int) -> list[Setting]:
    """The setting at the middle of each of `points` equal stretches of training."""
    return [schedule.setting_at((i + 0.5) / points) for i in range(points)]


def expected_time(stage_seconds: list[float], total_steps: int) -> float:
    """Wall-clock of `total_steps` steps whose per-step time is `stage_seconds[i]` in stretch i of equal length."""
    return total_steps * sum(stage_seconds) / len(stage_seconds)


def time_steps(method, optimizer, batch: dict, setting: Setting, steps: int, warmup: int, bf16: bool) -> float:
    """Median seconds per training step under `setting` (after `warmup` untimed steps)."""
    device = next(method.parameters()).device
    batch = {**batch, "compression": setting}
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, _ = method(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(i + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def flops_speedup(method, schedule: CompressionSchedule, total_steps: int) -> float | None:
    """Uncompressed / compressed training FLOPs of the whole run by the method's FLOPs model (None without one)."""
    flops = method.flops_per_image
    if flops() is None:
        return None
    return total_steps * flops() / sum(flops(compression=schedule.at(step)) for step in range(total_steps))


def speed(cfg, args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = use_bf16(cfg) and device.type == "cuda"
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg).to(device).train()
    optimizer = make_optimizer(param_groups(method, cfg.optim.weight_decay), 1e-4, cfg.optim.betas, cpu_offload=False)
    total = args.total_steps or cfg.train.steps
    if not total:
        raise ConfigError("set --total-steps (or train.steps) for the expected wall-clock of the schedule")
    schedule = CompressionSchedule(cfg.compression, cfg.model.patch_size, total)
    stages = stage_settings(schedule, args.points)
    batch = synthetic_batch(cfg.data, cfg.model.img_size, device)
    seconds, memory = {}, {}
    for setting in [FULL, *stages]:
        key = (setting.patch_size, setting.keep_ratio)
        if key in seconds:
            continue
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds[key] = time_steps(method, optimizer, batch, setting, args.steps, args.warmup, bf16)
        memory[key] = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "-"
    tokens = method.tokens_per_image if method.tokens_per_image() is not None else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{cfg.method.name}, model {cfg.model.embed_dim}d x {cfg.model.depth}, patch {cfg.model.patch_size}, "
          f"img {cfg.model.img_size}, batch {cfg.data.batch_size}, views {cfg.data.views}, {name}, "
          f"{'bf16' if bf16 else 'fp32'}")
    print(f"{'progress':>11} {'patch':>5} {'keep':>5} {'tokens':>6} {'ms/step':>8} {'img/s':>8} {'mem GB':>6}")
    rows = []
    for i, setting in enumerate([FULL, *stages]):
        key = (setting.patch_size, setting.keep_ratio)
        span = "full" if i == 0 else f"{(i - 1) / args.points:.2f}-{i / args.points:.2f}"
        tok = tokens(compression=setting) if tokens else ""
        rows.append({"progress": span, "patch_size": setting.patch_size or cfg.model.patch_size,
                     "keep_ratio": setting.keep_ratio, "tokens": tok, "seconds": seconds[key]})
        print(f"{span:>11} {setting.patch_size or cfg.model.patch_size:>5} {setting.keep_ratio:>5.2f} {tok:>6} "
              f"{1e3 * seconds[key]:>8.1f} {cfg.data.batch_size / seconds[key]:>8.1f} {memory[key]:>6}")
    full_time = expected_time([seconds[(None, 1.0)]], total)
    compressed = expected_time([seconds[(s.patch_size, s.keep_ratio)] for s in stages], total)
    summary = {"total_steps": total, "uncompressed_hours": full_time / 3600, "compressed_hours": compressed / 3600,
               "speedup": full_time / compressed, "stages": rows}
    summary["flops_speedup"] = flops_speedup(method, schedule, total)
    print(f"{total} steps on one device: uncompressed {full_time / 3600:.2f} h, compressed {compressed / 3600:.2f} h, "
          f"speedup {summary['speedup']:.2f}x" + (f" (FLOPs model {summary['flops_speedup']:.2f}x)"
                                                   if summary["flops_speedup"] else ""))
    return summary


def learn(cfg, args) -> dict:
    """Train uncompressed and compressed from the same config; wall-clock and k-NN / linear probe of each."""
    root = cfg.output_dir
    for sub in ("full", "compressed"):
        if (root / sub).exists():
            raise ConfigError(f"{root / sub} exists; remove it or choose another run.output_dir")
    world = init_distributed()
    if ensure_demo_shards(cfg.data, cfg.output_dir / "shards", world.is_main):  # the embedded digits, once
        barrier()
    results = {}
    for sub in ("full", "compressed"):
        run = copy.deepcopy(cfg)
        run.run.output_dir, run.run.resume, run.eval.at_end = str(root / sub), "", False
        if sub == "full":
            run.compression = CompressionConfig()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = train(run, build_method)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        module = result.engine.module
        scores = evaluate_encoder(module.encoder, run, next(module.parameters()).device)
        results[sub] = {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": result.steps, **scores}
        log.info("%s: %d steps in %.0f s (%.0f CPU s), knn %.1f%%, linear %.1f%%", sub, result.steps, seconds,
                 cpu_seconds, scores["knn_top1"], scores["linear_top1"])
    full, comp = results["full"], results["compressed"]
    results["speedup"] = full["seconds"] / comp["seconds"]
    results["cpu_speedup"] = full["cpu_seconds"] / comp["cpu_seconds"]
    results["flops_speedup"] = flops_speedup(module, CompressionSchedule(cfg.compression, cfg.model.patch_size,
                                                                         comp["steps"]), comp["steps"])
    print(f"{'run':>10} {'steps':>6} {'wall s':>8} {'CPU s':>8} {'knn %':>6} {'linear %':>8}")
    for sub in ("full", "compressed"):
        r = results[sub]
        print(f"{sub:>10} {r['steps']:>6} {r['seconds']:>8.0f} {r['cpu_seconds']:>8.0f} {r['knn_top1']:>6.1f} "
              f"{r['linear_top1']:>8.1f}")
    print(f"compressed: {results['speedup']:.2f}x less wall-clock, {results['cpu_speedup']:.2f}x less CPU time of "
          f"the training process (FLOPs model {results['flops_speedup'] or 0:.2f}x), "
          f"k-NN {comp['knn_top1'] - full['knn_top1']:+.1f} points, linear "
          f"{comp['linear_top1'] - full['linear_top1']:+.1f} points")
    (root / "learning_check.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = config_parser("python -m benchmarks.compression", __doc__.split("\n")[0],
                           "YAML file(s) as for train.pretrain, later ones win", commands=("speed", "learn"))
    parser.add_argument("--steps", type=int, default=10, help="speed: timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="speed: untimed steps per setting")
    parser.add_argument("--points", type=int, default=10, help="speed: equal stretches of training to time")
    parser.add_argument("--total-steps", type=int, default=0, help="speed: run length (default train.steps)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: bench(args))


def bench(args) -> None:
    cfg = config_of(args)
    result = speed(cfg, args) if args.command == "speed" else learn(cfg, args)
    if cfg.run.output_dir and args.command == "speed":
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "compression_speed.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
