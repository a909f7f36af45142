"""Fine-tune a pretrained encoder (MAE/BEiT recipe) on the engine, evaluating top-1/top-5 on data.val.

    python -m train.eval.finetune --config train/configs/finetune_vit_b.yaml method.init=RUN_OR_EXPORT \\
        data.train=.../train.json data.val=.../val.json
    torchrun --nproc_per_node 8 -m train.eval.finetune --config ...      # or deepspeed / sbatch, as pretraining

A run of method `finetune` (see train/methods/classify.py): DeepSpeed, checkpoints, resume and
preemption as in pretraining. data.val is evaluated after every checkpoint (eval/top1, eval/top5,
eval/loss in TensorBoard) and the final numbers go to <output_dir>/eval/<method>_step_N.json.
`python -m train.eval.linear_probe` is the same runner for method `linear_probe`.
"""

import sys

from train.cli import USER_ERRORS, classification_parser, run_classification, run_command


def main(argv=None) -> int:
    args = classification_parser("python -m train.eval.finetune").parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: run_classification(args, "finetune"), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
