"""The shard command line: `python -m data_pipeline.shards digits|folder|list|verify ...` (see the package)."""

import argparse
import json
import logging
import sys
from pathlib import Path

from data_pipeline.shards import __doc__ as DOC
from data_pipeline.shards import available_cpus, build_digits_shards, convert, folder_sources, list_sources, verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.shards", description=DOC.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_digits = sub.add_parser("digits", help="write the embedded digits data set (train + val)")
    p_digits.add_argument("out_dir")
    p_folder = sub.add_parser("folder", help="convert an image-folder tree (one folder per class)")
    p_folder.add_argument("root")
    p_list = sub.add_parser("list", help="convert the files of a list (one path per line, or CSV path,label)")
    p_list.add_argument("list_file")
    p_list.add_argument("--root", default=None, help="folder of the relative paths (default: the list's folder)")
    for p in (p_folder, p_list):
        p.add_argument("out_dir")
        p.add_argument("--split", default="train")
        p.add_argument("--workers", type=int, default=available_cpus(), help="worker processes (default: the CPUs "
                       "this process may use)")
        p.add_argument("--max-bytes", type=float, default=256e6, help="target bytes per shard")
        p.add_argument("--max-count", type=int, default=0, help="at most this many samples per shard (0: no cap)")
        p.add_argument("--max-side", type=int, default=0, help="re-encode images whose longest side is larger")
        p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
        p.add_argument("--seed", type=int, default=0, help="seed of the one-off file shuffle")
    p_verify = sub.add_parser("verify", help="check every shard of a manifest (or a shard pattern)")
    p_verify.add_argument("manifest")
    p_verify.add_argument("--workers", type=int, default=available_cpus(), help="worker processes")
    p_verify.add_argument("--no-decode", action="store_true", help="check the tar structure only")
    p_verify.add_argument("--no-labels", action="store_true",
                          help="accept samples without a class index (.cls), e.g. img2dataset shards for pretraining")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.command == "digits":
        for split, path in build_digits_shards(args.out_dir).items():
            print(f"{split}: {json.loads(path.read_text())['num_samples']} samples, manifest {path}")
        return 0
    if args.command == "verify":
        total, problems = verify(args.manifest, args.workers, not args.no_decode, not args.no_labels)
        for problem in problems:
            print(problem)
        print(f"{args.manifest}: {total} samples read, {len(problems)} problems")
        return 1 if problems else 0
    if args.command == "folder":
        (sources, classes), base = folder_sources(args.root), args.root
    else:
        (sources, classes), base = list_sources(args.list_file), args.root or Path(args.list_file).parent
    manifest = convert(sources, classes, base, args.out_dir, args.split, workers=args.workers,
                       max_count=args.max_count, max_bytes=args.max_bytes, max_side=args.max_side,
                       quality=args.quality, seed=args.seed)
    for item in manifest["skipped"][:20]:
        print(f"skipped {item['key']}: {item['reason']}")
    print(f"{args.split}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, {len(classes)} "
          f"classes, {manifest['converted']} converted, {len(manifest['skipped'])} skipped; manifest "
          f"{Path(args.out_dir) / (args.split + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
