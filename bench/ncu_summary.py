#!/usr/bin/env python3
"""Where a training step's GPU time goes, from Nsight Compute's per-kernel durations.

On the GPU machine (bench/gpu.md, "Where a step's time goes"), a two-step run under ncu:
    ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
        --log-file ncu.csv ./loraforge-trainer train --spec job.json --out /tmp/out --device cuda
then, anywhere:
    python3 bench/ncu_summary.py before ncu-before.csv after ncu-after.csv
prints one markdown table: the kernels of the last step (the kernels after the last optimizer
step but one, found by AdamW's kernels over the flat buffer of the adapter's factors) by category, in ms.
ncu runs the kernels one at a time, so the sum is the step's time without overlap.
"""
import collections
import csv
import gzip
import sys
def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    lines = opener(path, "rt").read().splitlines()
    start = next(i for i,l in enumerate(lines) if l.startswith('"ID"'))
    return [(int(r["ID"]), r["Kernel Name"], r["Grid Size"], float(r["Metric Value"].replace(",",""))/1e3) for r in csv.DictReader(lines[start:])]
def category(n):
    if "nvjet" in n or "gemm" in n.lower() or "splitKreduce" in n: return "matrix products (cuBLAS)"
    if "sdpa" in n or "fmha" in n or "cudnn" in n: return "attention (cuDNN flash)"
    if "swiglu" in n: return "SwiGLU (our kernel)"
    if "rope_" in n: return "RoPE (our kernel)"
    if "rms_norm_backward" in n: return "RMSNorm backward (our kernel)"
    if "layer_norm" in n: return "RMSNorm forward, backward (aten)"
    if "silu" in n: return "SiLU and its gradient (libtorch)"
    if "Cat" in n or "neg_kernel" in n: return "concatenations, negation"
    if "dot_kernel" in n or "reduce" in n: return "reductions, dot products"
    if "copy" in n or "Fill" in n: return "copies, fills, casts"
    return "other elementwise (products, sums: RoPE, SwiGLU, residuals)"
def clusters(ids):
    """Runs of kernel IDs no more than 100 apart."""
    runs = [[ids[0]]]
    for i in ids[1:]:
        if i - runs[-1][-1] > 100: runs.append([])
        runs[-1].append(i)
    return runs
def step(K):
    """The last step's kernels: those after the last group of AdamW kernels over the flat buffer
    but one. That buffer's grid is the one whose dense groups (8 or more kernels close together,
    AdamW's dozen) come in at least two steps and end latest."""
    by_grid = collections.defaultdict(list)
    for k in K: by_grid[k[2]].append(k[0])
    best = None
    for grid, ids in by_grid.items():
        dense = [c for c in clusters(ids) if len(c) >= 8]
        if len(dense) >= 2 and (best is None or dense[-1][-1] > best[-1][-1]): best = dense
    lo, hi = best[-2][-1] + 1, best[-1][-1]
    return [k for k in K if lo <= k[0] <= hi]
out = []
# Labelled profiles: label path [label path ...] (ncu's --csv --log-file output, gzipped or not).
for label, path in zip(sys.argv[1::2], sys.argv[2::2]):
    S = step(load(path)); by = collections.defaultdict(float)
    for k in S: by[category(k[1])] += k[3]
    out.append((label, len(S), by))
cats = sorted({c for _,_,b in out for c in b}, key=lambda c: -max(b.get(c,0) for _,_,b in out))
print("| kernels of one step (ms) | " + " | ".join(l for l,_,_ in out) + " |")
print("|---|" + "---|"*len(out))
for c in cats: print(f"| {c} | " + " | ".join(f"{b.get(c,0)/1e3:.1f}" for _,_,b in out) + " |")
print("| **total** | " + " | ".join(f"**{sum(b.values())/1e3:.1f}**" for _,_,b in out) + " |")
print("| kernel launches | " + " | ".join(str(n) for _,n,_ in out) + " |")
