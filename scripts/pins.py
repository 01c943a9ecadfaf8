"""Requirement lines from pyproject.toml, the one place versions are written (for scripts/setup.sh).

pins.py --version vllm                      # 0.32.0
pins.py torchvision torchaudio              # those requirement lines
pins.py --all --extras test,embedded --exclude vllm,torch   # every pinned requirement but those
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str]) -> dict[str, str]:
    """name -> requirement line, of the main dependencies and the given extras."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    return {re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0].lower(): line for line in lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--version", help="print the pinned version of this package")
    parser.add_argument("--all", action="store_true", help="every pinned requirement")
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups to include")
    parser.add_argument("--exclude", default="", help="comma-separated package names to leave out")
    args = parser.parse_args()
    reqs = requirements([e for e in args.extras.split(",") if e])
    if args.version:
        print(reqs[args.version.lower()].split("==", 1)[1])
        return
    excluded = {e.lower() for e in args.exclude.split(",") if e}
    names = list(reqs) if args.all else [n.lower() for n in args.names]
    print(" ".join(reqs[n] for n in names if n not in excluded and (not args.all or "==" in reqs[n])))


if __name__ == "__main__":
    main()
