"""The mutation score of the last `mutmut run` (`make mutation`), per module and overall.

A mutant is detected when a test failed (killed) or hung past mutmut's limit (timeout); it is missed when every test
passed (survived) or no test ran its code (no tests). Prints a markdown table and the survivors' names.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DETECTED = {"killed", "timeout"}


def main() -> None:
    out = subprocess.run(
        [str(ROOT / ".venv/bin/mutmut"), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    by_module: dict[str, Counter] = defaultdict(Counter)
    missed: list[str] = []
    for line in out.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if not match:
            continue
        name, status = match.groups()
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        by_module[module][status] += 1
        if status not in DETECTED:
            missed.append(f"{name}: {status}")
    if not by_module:
        sys.exit("no mutation results: run `make mutation` first")
    print("| module | mutants | detected | survived | no tests | score |")
    print("|---|---:|---:|---:|---:|---:|")
    total = Counter()
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        print(row(module, counts))
    print(row("**all**", total))
    print(f"\n{len(missed)} missed:")
    print("\n".join(missed))


def row(name: str, counts: Counter) -> str:
    n = sum(counts.values())
    detected = sum(counts[s] for s in DETECTED)
    return f"| {name} | {n} | {detected} | {counts['survived']} | {counts['no tests']} | {100 * detected / n:.1f}% |"


if __name__ == "__main__":
    main()
