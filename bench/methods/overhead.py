"""What each adapter method costs per training step, against plain LoRA, on one model (not a test).

Usage: python3 bench/methods/overhead.py --trainer BIN [BIN ...] [--device cuda|cpu] [--shape S]
                                         [--seq N] [--batch N] [--steps N] [--rounds N]
                                         [--methods NAME,...] [--profile]

Builds the model of bench/compare.py (random weights, TinyLlama-1.1B shape on CUDA: 22 layers,
so 154 adapted matrices with all seven projections), then trains each method on it with the
same data, batch and steps, and reports tokens/s after the warm-up steps and the ratio to LoRA.
Every method keeps rank 8 per matrix on average; the adaptive ones are configured so that their
rank machinery runs during the timed steps (AdaLoRA pruning, IncreLoRA and TriAdaptLoRA
growing, CoDyRA thresholding): the cost measured is that of the busy phase. Rounds alternate
the methods, so a noisy neighbour slows all of them alike.

Several trainers (say, one built before a change and one after) run side by side: every round
runs every method with each of them in turn, and each gets its own table, its ratios to its own
LoRA. `--methods` keeps the methods whose names start with one of the given words (LoRA is
always kept, as the reference).
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare import TARGETS, run, steady_rate, workload, write_job  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def methods(steps: int) -> dict:
    """Rank 8 per matrix on average at the end; rank changes during the timed steps."""
    half = steps // 2
    return {
        "lora r=8": {"type": "lora", "r": 8, "alpha": 16},
        "adalora 12->8": {"type": "adalora", "init_r": 12, "target_r": 8, "alpha": 16, "tinit": 1,
                          "tfinal": 2, "delta_t": 1},
        "sora r=8": {"type": "sora", "r": 8, "alpha": 16},
        "dylora 8": {"type": "dylora", "r": 8, "alpha": 16},
        "increlora 4->8": {"type": "increlora", "target_rank": 8, "lora_r": 4, "init_warmup": 1,
                           "incre_interval": 1, "top_h": 16, "incre_rank_num": 1, "alpha": 16},
        "triadaptlora 4->8": {"type": "triadaptlora", "reference_rank": 8, "init_rank": 4,
                              "incre_interval": 1, "incre_rank_num": 1, "alpha": 16},
        "codyra r=8": {"type": "codyra", "r": 8, "max_kappa": 1e-3, "lambda_num": max(2, half // 2),
                       "dense_iters": 0.25},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", required=True, nargs="+")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="time each phase of a step (LORAFORGE_PROFILE_STEPS) and print the trainer's "
                         "'step profile:' lines per method; the device syncs at each phase, so rates drop")
    args = ap.parse_args()
    _, shape, seq, batch, warmup = workload(args)
    total = warmup + args.steps
    env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
    if args.profile:
        env["LORAFORGE_PROFILE_STEPS"] = str(warmup)
    chosen = {name: method for name, method in methods(total).items()
              if args.methods is None or name.startswith("lora ")
              or any(name.startswith(w) for w in args.methods.split(","))}
    rates: dict = {(trainer, name): [] for trainer in args.trainer for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([args.trainer[0], "fixture", "--out", str(work / "fixture")])
        run([sys.executable, str(HERE / "peft_baseline.py"), "--device", args.device, "--shape", shape,
             "--seq", str(seq), "--batch", str(batch), "--save-model", str(work / "model")])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(work / "fixture/model" / name, work / "model" / name)
        job_path = write_job(work, seq, batch, total)
        base_job = json.loads(job_path.read_text())
        for round_ in range(1, args.rounds + 1):
            for name, method in chosen.items():
                for trainer in args.trainer:
                    job = dict(base_job, method={**method, "dropout": 0.0, "target_modules": TARGETS})
                    spec = work / "method.json"
                    spec.write_text(json.dumps(job))
                    trained = subprocess.run([trainer, "train", "--spec", str(spec), "--out", str(work / "out"),
                                              "--device", args.device], env=env, capture_output=True, text=True)
                    if trained.returncode != 0:
                        raise SystemExit(f"{name} ({trainer}) failed:\n{trained.stderr[-4000:]}")
                    summary = json.loads(trained.stdout.splitlines()[-1])
                    rates[trainer, name].append(steady_rate(trained.stderr, summary, warmup, batch * seq))
                    print(f"round {round_}: {trainer} {name} {rates[trainer, name][-1]} tokens/s", file=sys.stderr)
                    if args.profile:
                        print("\n".join(line[line.index("step profile:"):] for line in trained.stderr.splitlines()
                                        if "step profile:" in line), file=sys.stderr)
    for trainer in args.trainer:
        lora = statistics.median(rates[trainer, "lora r=8"])
        print(f"{datetime.date.today()}, {args.device}, {shape} shape, batch {batch} x seq {seq}, all seven "
              f"projections, {args.steps} timed steps after {warmup} warm-up, median of {args.rounds} rounds, "
              f"trainer {trainer}")
        print("| method | tokens/s (median) | each round | ratio to LoRA |")
        print("|---|---|---|---|")
        for name in chosen:
            values = rates[trainer, name]
            median = statistics.median(values)
            print(f"| {name} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {median / lora:.3f} |")
        print()


if __name__ == "__main__":
    main()
