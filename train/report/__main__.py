"""`python -m train.report RUN_DIR [--out FILE]`: the run's HTML report (curves, evaluation, image panels)."""

import argparse
import logging
import sys

from train.cli import USER_ERRORS, run_command
from train.report import write_report

log = logging.getLogger("train")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split(": ", 1)[1])
    parser.add_argument("run_dir", help="a run directory (run.output_dir: metrics.jsonl, tb/, eval.json)")
    parser.add_argument("--out", default=None, help="where to write the page (default RUN_DIR/report.html)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: log.info("run report: %s", write_report(args.run_dir, args.out)), errors=USER_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
