"""The native kernel's stages and whole kernels timed in C on one core, built with the library's flags.

    python benchmarks/native_stages.py [--seconds 0.3] [--json benchmarks/results/native_stages.json]

``benchmarks/directions.py --native`` times the kernels through zo_fx's Python calls and torch;
this times what the compiled loops themselves do (``native_stages.c`` includes the library's
source), stage by stage: Philox, the Box-Muller radius and angle, whole Gaussian values,
Rademacher sign words, and the tile and update kernels on tiles from L1 to past the L2, beside a
``memcpy`` of the same bytes. It prints the CPU and the flags, so runs on different machines can
be read side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from directions import cpu_model  # noqa: E402

from zo_fx.kernels import native  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=0.3, help="time per line")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    info = native.info()
    if not info.get("loaded"):
        raise SystemExit(f"the native library is not available here: {info.get('error', 'ZO_FX_NATIVE=0')}")
    flags = [f for f in info["flags"].split() if f not in ("-shared", "-fPIC")]
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "native_stages"
        subprocess.run([info["compiler"], *flags, "-o", str(exe), str(_HERE / "native_stages.c"), "-lm"], check=True)
        text = subprocess.run([str(exe), str(args.seconds)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in text.strip().splitlines():
        what, rate, unit = line.split("\t")
        rows.append({"stage": what, "rate": float(rate), "unit": unit})
    result = {"cpu": cpu_model(), "flags": info["flags"], "threads": 1, "rows": rows}
    print(f"CPU: {result['cpu']}; one thread; flags: {result['flags']}")
    print("| stage | rate | unit |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['rate']:.2f} | {r['unit']} |")
    if args.json:  # the table above, for plots and comparisons between machines
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
