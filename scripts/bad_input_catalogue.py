"""Write the bad-input catalogue (docs/bad-input.md) from tests/bad_inputs.py.

    python scripts/bad_input_catalogue.py > docs/bad-input.md

Runs every case there, offline, each in a fresh temporary directory, and writes the one line
normlab printed (the directory shown as <tmp>); a case tested elsewhere gets the text its test
checks. tests/test_bad_input.py checks that this file lists every case.
"""
from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bad_inputs import CASES, Case, run  # noqa: E402


def main() -> int:
    rows = collections.defaultdict(list)
    for case in CASES:
        if isinstance(case, Case):
            with tempfile.TemporaryDirectory() as tmp:
                code, stderr, _ = run(case, Path(tmp).resolve())
                line = stderr.strip().replace(str(Path(tmp).resolve()), "<tmp>")
            if code != 2 or case.expect not in line:
                print(f"{case.id}: not refused as expected (exit {code}): {line}", file=sys.stderr)
                return 1
            command = "normlab " + " ".join(a.replace("{", "<").replace("}", ">") for a in case.args)
            where = f"`tests/test_bad_input.py` [{case.id}]"
        else:
            line, command, where = f"… {case.expect} …", "", f"`{case.test}`"
        rows[case.area].append(f"| `{case.id}` | {case.what} | {f'`{command}`' if command else ''} | "
                               f"{escape(line)} | {where} |")
    print("# Inputs normlab refuses\n")
    print("Every one gets one line on stderr that names the problem and the fix, exit code 2, and no "
          "traceback; nothing is written that could pass for a result, and nothing already written is "
          "damaged. Written by `python scripts/bad_input_catalogue.py > docs/bad-input.md` from "
          "`tests/bad_inputs.py`, which `tests/test_bad_input.py` runs; `<tmp>` is a scratch "
          "directory, `<data>` a small CIFAR-10 copy in it, `<file>` a plain file.\n")
    print(f"{sum(len(r) for r in rows.values())} inputs.\n")
    for area, lines in rows.items():
        print(f"## {area[0].upper() + area[1:]}\n")
        print("| id | input | command | what normlab says | test |")
        print("|---|---|---|---|---|")
        print("\n".join(lines) + "\n")
    return 0


def escape(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
