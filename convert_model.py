#!/usr/bin/env python
"""Split a unified HyperCLOVAX-SEED checkpoint into the component folders the services load.

Thin CLI over hcxserve.convert; see docs/converter.md for the output layout and guarantees.
"""

from __future__ import annotations

import argparse
import logging
import sys

from hcxserve.convert import (
    COMPONENTS,
    DEFAULT_MAX_SHARD_SIZE,
    DTYPE_CHOICES,
    TRACKS,
    ConvertError,
    convert,
    format_plan,
)

EPILOG = """\
examples:
  # Think-32B (track a): llm/ (vLLM HCXVisionV2ForCausalLM, projector included) + ve/ (Qwen2.5-VL ViT)
  python convert_model.py --input ckpt/HyperCLOVAX-SEED-Think-32B --output models/think32b --track a --verify

  # Omni-8B (track b), only the encoders, bf16, plan first
  python convert_model.py -i ckpt/HyperCLOVAX-SEED-Omni-8B -o models/omni8b -t b -c ve ae --dtype bfloat16 --dry-run

exit codes: 0 done or up to date, 2 bad input / refused / verification failed, 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_model.py",
        description="Split a unified HyperCLOVAX-SEED checkpoint into component folders "
        "(streaming, atomic, verifiable).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-i", "--input", required=True, help="unified HF checkpoint folder (config.json + safetensors)")
    p.add_argument("-o", "--output", required=True, help="output folder (created atomically)")
    p.add_argument("-t", "--track", required=True, choices=TRACKS, help="a = Think-32B, b = Omni-8B")
    p.add_argument(
        "-c", "--components", nargs="+", choices=("all",) + COMPONENTS, default=["all"],
        help="components to write (default: all of the track's; ae/vd/ad exist on track b only)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=tuple(DTYPE_CHOICES), default="keep", help="cast floating tensors (default keep)"
    )
    p.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 500MB, 5GB, 4GiB (default %(default)s)"
    )
    p.add_argument("--verify", action="store_true", help="re-read every output tensor and compare it with the input")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty output (only once the new one is complete)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or log lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = convert(
            args.input,
            args.output,
            track=args.track,
            components=args.components,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            verify=args.verify,
            dry_run=args.dry_run,
            force=args.force,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    if result.status == "dry-run":
        print(format_plan(result))
    elif result.status == "up-to-date":
        print(f"{result.output}: up to date (same input fingerprint and options); nothing to do")
    else:
        counts = ", ".join(
            f"{name} {entry['tensors']} tensors" for name, entry in result.manifest["components"].items()
        )
        print(f"{result.output}: converted ({counts}){'; verified' if args.verify else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
