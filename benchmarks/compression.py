"""What a compression schedule buys: per-step time by schedule stage, and a learning check.

    python -m benchmarks.compression speed --config RUN.yaml --config train/configs/compression/moco_v3.yaml
    python -m benchmarks.compression learn --config train/configs/mae_demo.yaml \
        --config train/configs/compression/mae.yaml --budgets 0.25,0.5,1 --seeds 0,1,2

`speed` times full training steps (forward, backward, AdamW; bf16 autocast on GPU; synthetic batches of
the run's views, so the data pipeline is not measured) at the setting of each stage of the schedule and
at full tokens, and prints the expected wall-clock of the whole schedule against the uncompressed run
(a Riemann sum over `--points` equal stretches of training). One GPU, plain PyTorch: communication is
left out. `learn` compares uncompressed and compressed training at EQUAL compute: at each of `--budgets`
(fractions of the uncompressed run's FLOPs; `train.budget` picks each run's steps) and `--seeds`, it
trains both and prints accuracy vs compute (k-NN and linear probe on data.val, mean +- std over seeds)
and the speedup to equal accuracy: the largest budget over the budget at which the compressed runs
reach the uncompressed run's accuracy at the largest budget (interpolated), with its spread over seeds.
"""

import argparse
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


def speedup_to_accuracy(budgets: list[float], accuracy: list[float], target: float) -> tuple[float | None, str]:
    """(budget at which the accuracy-vs-budget curve first reaches `target`, how it was found).

    Linear interpolation between the measured budgets; "reached" at the smallest budget gives only a
    bound (the budget is at most that), "not reached" gives None.
    """
    if accuracy[0] >= target:
        return budgets[0], "at most"
    for (b0, a0), (b1, a1) in zip(zip(budgets, accuracy), zip(budgets[1:], accuracy[1:])):
        if a1 >= target:
            return b0 + (b1 - b0) * (target - a0) / (a1 - a0), "interpolated"
    return None, "not reached"


def learn(cfg, args) -> dict:
    """Uncompressed vs compressed at EQUAL compute: for each budget (a fraction of the training FLOPs of the
    config's uncompressed run) and seed, both train for that many FLOPs (train.budget picks the steps) and
    are evaluated (k-NN and linear probe of the encoder the method reports with, DINO: the teacher).
    The speedup to equal accuracy is largest budget / the budget at which the compressed runs reach the
    uncompressed run's accuracy at the largest budget (interpolated), per seed, then mean and spread."""
    root = cfg.output_dir
    budgets, seeds = sorted(args.budgets), args.seeds
    if any((root / sub).exists() for sub in ("full", "compressed")):
        raise ConfigError(f"{root}/full or {root}/compressed exists; remove it or choose another run.output_dir")
    if not CompressionSchedule(cfg.compression, cfg.model.patch_size, 1).active:
        raise ConfigError("learn compares against a compression schedule: add one (--config "
                          "train/configs/compression/<method>.yaml)")
    world = init_distributed()
    if ensure_demo_shards(cfg.data, cfg.output_dir / "shards", world.is_main):  # the embedded digits, once
        barrier()
    runs = []
    for seed in seeds:
        for budget in budgets:
            for sub in ("full", "compressed"):
                run = copy.deepcopy(cfg)
                run.run.output_dir = str(root / sub / f"budget{budget:g}_seed{seed}")
                run.run.resume, run.eval.at_end, run.run.seed, run.train.budget = "", False, seed, budget
                if sub == "full":
                    run.compression = CompressionConfig()
                start, cpu_start = time.perf_counter(), time.process_time()
                result = train(run, build_method)
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                module = result.engine.module
                scores = evaluate_encoder(module.eval_encoder(), run, next(module.parameters()).device)
                runs.append({"run": sub, "budget": budget, "seed": seed, "steps": result.steps, "seconds": seconds,
                             "cpu_seconds": cpu_seconds, **scores})
                log.info("%s budget %g seed %d: %d steps in %.0f s, knn %.1f%%, linear %.1f%%", sub, budget, seed,
                         result.steps, seconds, scores["knn_top1"], scores["linear_top1"])

    def curve(sub, seed, metric):
        return [next(r[metric] for r in runs if (r["run"], r["budget"], r["seed"]) == (sub, b, seed)) for b in budgets]

    def spread(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None

    print(f"accuracy vs compute (budget: fraction of the uncompressed {cfg.train.steps or cfg.train.epochs}"
          f"{'-step' if cfg.train.steps else '-epoch'} run's FLOPs), mean +- std over seeds {seeds}")
    print(f"{'budget':>7} {'run':>10} {'steps':>6} {'CPU s':>7} {'knn %':>12} {'linear %':>12}")
    table = []
    for budget in budgets:
        for sub in ("full", "compressed"):
            rows = [r for r in runs if (r["run"], r["budget"]) == (sub, budget)]
            knn, linear = spread([r["knn_top1"] for r in rows]), spread([r["linear_top1"] for r in rows])
            table.append({"budget": budget, "run": sub, "steps": rows[0]["steps"], "knn_top1": knn,
                          "linear_top1": linear})
            cpu = statistics.mean(r["cpu_seconds"] for r in rows)
            print(f"{budget:>7g} {sub:>10} {rows[0]['steps']:>6} {cpu:>7.0f} {knn[0]:>6.1f} +-{knn[1]:>4.1f} "
                  f"{linear[0]:>6.1f} +-{linear[1]:>4.1f}")
    speedups = {}
    for metric in ("knn_top1", "linear_top1"):
        per_seed = []
        for seed in seeds:
            target = curve("full", seed, metric)[-1]
            reached, how = speedup_to_accuracy(budgets, curve("compressed", seed, metric), target)
            per_seed.append({"seed": seed, "target": target, "budget": reached, "how": how,
                             "speedup": budgets[-1] / reached if reached else None})
        found = [s["speedup"] for s in per_seed if s["speedup"] is not None]
        speedups[metric] = {"per_seed": per_seed, "mean_std": spread(found), "seeds_reached": len(found)}
        summary = (f"{speedups[metric]['mean_std'][0]:.2f}x +- {speedups[metric]['mean_std'][1]:.2f}"
                   if found else "none")
        bounds = sum(s["how"] == "at most" for s in per_seed)
        note = f", {bounds} of them already at the smallest budget: a lower bound" if bounds else ""
        print(f"speedup to the uncompressed {metric} at budget {budgets[-1]:g}: {summary} (reached by "
              f"{len(found)}/{len(seeds)} seeds{note})")
    results = {"budgets": budgets, "seeds": seeds, "runs": runs, "table": table, "speedup_to_equal_accuracy": speedups}
    (root / "learning_check.json").write_text(json.dumps(results, indent=1))
    return results


def parse_list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
    return parse


def main(argv=None) -> int:
    parser = config_parser("python -m benchmarks.compression", __doc__.split("\n")[0],
                           "YAML file(s) as for train.pretrain, later ones win", commands=("speed", "learn"))
    parser.add_argument("--steps", type=int, default=10, help="speed: timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="speed: untimed steps per setting")
    parser.add_argument("--points", type=int, default=10, help="speed: equal stretches of training to time")
    parser.add_argument("--total-steps", type=int, default=0, help="speed: run length (default train.steps)")
    parser.add_argument("--budgets", type=parse_list(float), default=[0.25, 0.5, 1.0],
                        help="learn: compute budgets, fractions of the uncompressed run's training FLOPs")
    parser.add_argument("--seeds", type=parse_list(int), default=[0, 1, 2], help="learn: seeds per budget")
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
