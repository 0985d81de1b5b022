#!/usr/bin/env python3
"""How far apart loss curves of the same training land (bench/gpu.md, "How wide is the band?").

Usage: python3 bench/curve_band.py lc-A.json [lc-B.json ...]   (bench/loss_curve.py's --json-out)

The reference is the PEFT curve of the first file; every other curve (each file's loraforge
curve, and a PEFT curve that differs from the reference: a second PEFT run) is compared with it
step by step. Prints one markdown table: final loss, its relative difference, the mean of the
last ten steps' relative differences, the median relative gap over all steps, and the largest
relative gap after step 100 (where the loss is small and relative differences grow).
"""
import json
import statistics
import sys
from pathlib import Path


def compare(name: str, curve: list, ref: list) -> str:
    rel = [c / r - 1 for c, r in zip(curve, ref)]
    last10 = statistics.mean(rel[-10:])
    late = max(rel[100:], key=abs)
    return (f"| {name} | {curve[-1]:.6f} | {rel[-1]:+.2%} | {last10:+.2%} | "
            f"{statistics.median(abs(x) for x in rel):.2%} | {late:+.2%} |")


def main() -> None:
    files = [Path(p) for p in sys.argv[1:]]
    runs = [(p.stem.removeprefix("lc-"), json.loads(p.read_text())) for p in files]
    ref = runs[0][1]["peft"]
    print(f"reference: PEFT's curve in {files[0].name}, final loss {ref[-1]:.6f}")
    print("| curve | final loss | final vs PEFT | last 10 steps vs PEFT | median gap | largest gap after step 100 |")
    print("|---|---|---|---|---|---|")
    for name, run in runs:
        if run["peft"] != ref:
            print(compare(f"PEFT again ({name})", run["peft"], ref))
        print(compare(name, run["loraforge"], ref))


if __name__ == "__main__":
    main()
