"""Linear probe of a frozen encoder: BatchNorm without affine, then a linear layer (MAE's recipe).

    python -m train.eval.linear_probe --config train/configs/linprobe_vit_b.yaml method.init=RUN_OR_EXPORT \\
        data.train=.../train.json data.val=.../val.json

runs method `linear_probe` on the engine (MAE: augmented images through the frozen encoder, LARS,
top-1/top-5 on data.val after every checkpoint; see train/eval/finetune.py). The quick in-memory
probe on precomputed features that the demo's end-of-run evaluation fits is
`train.eval.metrics.fit_linear_probe`.
"""

import sys

from train.cli import USER_ERRORS, classification_parser, run_classification, run_command


def main(argv=None) -> int:
    args = classification_parser("python -m train.eval.linear_probe").parse_args(sys.argv[1:] if argv is None
                                                                                 else argv)
    return run_command(lambda: run_classification(args, "linear_probe"), USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
