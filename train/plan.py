"""Which ZeRO stage, micro-batch and activation checkpointing fit a recipe, before any GPU hour is spent.

    python -m train.plan --config train/configs/mae_vit_l.yaml --gpus 64 --gpu-memory 80 [section.key=value ...]

Builds the method on the meta device (no weights, seconds on a laptop for ViT-g), traces one forward
for the activations, and prints per GPU, for ZeRO-1/2/3 and ZeRO-3 with the optimizer on the CPU,
each without and with activation checkpointing: model states (parameters + gradients + optimizer
states), models held outside DeepSpeed (EMA / frozen teachers), activations at the largest
micro-batch that fits, communication per step and a modelled step time; then the fastest setting
that fits, as the overrides to run it with. The model behind the numbers is in `train/planning.py`.
"""

import sys

from train.cli import config_parser, run_command
from train.config import ConfigError
from train.methods import build_method
from train.planning import GB, footprint, human, parameters, plan
from train.recipe import load_config

SCENARIOS = ("1x80", "8x80", "64x80", "64x40")


def parse_args(argv):
    parser = config_parser("python -m train.plan", __doc__.split("\n")[0], "the run's YAML file(s), stacked in order")
    parser.add_argument("--table", nargs="+", metavar="RECIPE",
                        help="instead: one row per recipe of the recommended setting on the GPU counts and memory "
                             "sizes of --scenarios (the README's table)")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), metavar="GPUSxGB",
                        help="with --table: columns as GPUS x GB, e.g. 8x80")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in the run (data-parallel ranks)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU, GB")
    parser.add_argument("--reserve", type=float, default=3.0,
                        help="GB per GPU kept for the CUDA context, allocator fragmentation and comm buffers")
    parser.add_argument("--bandwidth", type=float, default=25.0,
                        help="GB/s per GPU of the slowest link collectives cross (InfiniBand HDR: ~25)")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 matmul peak per GPU (H100/H200: ~790)")
    parser.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilisation assumed for compute time")
    return parser.parse_intermixed_args(argv)


def report(cfg, fp, rows, best, gpus: int, gpu_memory: float, reserve: float, global_batch: int) -> str:
    lines = [
        f"{cfg.method.name} ViT {cfg.model.embed_dim}x{cfg.model.depth} /{cfg.model.patch_size} at {cfg.model.img_size}"
        f" px on {gpus} GPUs x {gpu_memory:g} GB, global batch {global_batch}",
        f"  parameters: {parameters(fp.trainable)} trained, {parameters(fp.frozen)} frozen in the model; outside "
        f"DeepSpeed {human(fp.outside)} (EMA / frozen teachers); activations {human(fp.activations)} per image "
        f"({human(fp.activations_ckpt)} with checkpointing); {fp.flops / 1e9:.0f} GFLOPs per image",
        "",
        "| setting | micro-batch x accum | states | outside | activations | total / GPU | comm / step | step (model) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    budget = (gpu_memory - reserve) * GB
    for e in rows:
        mark = "" if e.total <= budget else " (does not fit)"
        lines.append(f"| {e.setting.name} | {e.micro_batch} x {e.accumulation} | {human(e.states)} | {human(e.extras)} "
                     f"| {human(e.activations)} | {human(e.total)}{mark} | {human(e.comm)} | {e.step_time:.2f} s |")
    lines.append("")
    if best is None:
        lines.append("nothing fits, even at micro-batch 1: add GPUs or pick a smaller model")
    else:
        s = best.setting
        overrides = [f"train.deepspeed={s.deepspeed}", f"data.batch_size={best.micro_batch}"]
        if s.checkpointing:
            overrides.append("model.grad_checkpointing=true")
        lines.append(f"recommended: {s.name}, micro-batch {best.micro_batch} ({human(best.total)} of "
                     f"{gpu_memory:g} GB per GPU, ~{best.step_time:.2f} s per step): {' '.join(overrides)}")
    return "\n".join(lines)


def table(recipes: list[str], scenarios: list[str], **model) -> str:
    """The recommended setting of each recipe (rows) on each GPU count x memory (columns), as markdown."""
    columns = [tuple(map(float, s.lower().split("x"))) for s in scenarios]
    lines = ["| recipe (trained + frozen params) | " + " | ".join(f"{g:g} GPU{'s' * (g > 1)}, {m:g} GB"
                                                                 for g, m in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for recipe in recipes:
        cfg = load_config(recipe, (), 1)  # the global batch is the recipe's, whatever the GPU count
        fp, cells = footprint(cfg, build_method), []
        for gpus, memory in columns:
            global_batch = cfg.train.global_batch_size or cfg.data.batch_size * int(gpus)
            _, best = plan(fp, int(gpus), global_batch, memory, **model)
            cells.append("does not fit" if best is None else
                         f"`{best.setting.name}`, {best.micro_batch} x {best.accumulation} ({human(best.total)})")
        name = f"`{recipe}` ({parameters(fp.trainable)} + {parameters(fp.frozen)})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    model = dict(reserve=args.reserve, peak_flops=args.peak_tflops * 1e12, mfu=args.mfu, bandwidth=args.bandwidth)

    def body():
        if bool(args.table) == bool(args.config):
            raise ConfigError("give --config RECIPE (one plan) or --table RECIPE ... (the summary table)")
        if args.table:
            print(table(args.table, args.scenarios, **model))
            return
        cfg = load_config(args.config, args.overrides, args.gpus)
        global_batch = cfg.train.global_batch_size or cfg.data.batch_size * args.gpus
        fp = footprint(cfg, build_method)
        rows, best = plan(fp, args.gpus, global_batch, args.gpu_memory, **model)
        print(report(cfg, fp, rows, best, args.gpus, args.gpu_memory, args.reserve, global_batch))

    return run_command(body, errors=(ConfigError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
