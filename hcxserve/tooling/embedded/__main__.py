"""CLI: `python -m hcxserve.tooling.embedded --track {a,b} --output DIR [--cache DIR] [--no-check] [--force]`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .common import default_cache_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hcxserve.tooling.embedded", description=__doc__)
    parser.add_argument("--track", choices=["a", "b"], required=True, help="which embedded model to build")
    parser.add_argument("--output", type=Path, required=True, help="checkpoint folder (built atomically)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="download cache (default: $HCX_CACHE_DIR or ~/.cache/hcxserve)")
    parser.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="run the mapping-parity and reload checks (default: on)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    parser.add_argument("--chat-template", type=Path, default=None, help="override the track's chat template")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Everything is local; never let a transformers call wander off to the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    # Imported here, not at the top: only this module pulls in the builder, and the up-to-date path of the builder
    # returns before torch/transformers are imported.
    if args.track == "a":
        from .track_a import build_track_a as build
    else:
        from .track_b import build_track_b as build

    result = build(args.output, args.cache or default_cache_dir(), check=args.check, force=args.force,
                   chat_template_path=args.chat_template)
    if result.up_to_date:
        print(f"{result.output}: up to date")
        return 0
    summary = {"output": str(result.output), "seconds": round(result.seconds, 1), "token_ids": result.token_ids,
               "parity": result.parity, "stats": result.stats,
               "checks": {k: v for k, v in result.checks.items() if k != "errors"}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
