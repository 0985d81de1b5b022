"""loraforge against HF PEFT: LoRA training throughput on the same model, side by side.

Usage: python3 bench/compare.py --trainer BIN [--device cpu|cuda] [--shape S] [--seq N] [--batch N]
                                [--steps N] [--threads N] [--rounds N]
(bench/cpu_bench.sh builds the trainer and runs this for the CPU; see bench/README.md.)

Both train one model: bench/peft_baseline.py builds it (random weights, saved with
save_pretrained for loraforge), with LoRA r=16 alpha=32 on all seven projections, AdamW, the
same batch and sequence length (loraforge's rows are cut from long texts, so every row is
full), the same warm-up (2 steps on the CPU, 3 on CUDA) and timed steps, and on the CPU the same
thread count. Runs alternate, PEFT then loraforge, --rounds times, so a busy neighbour slows
both alike; the table gives the median tokens/s of each and the ratio loraforge/PEFT.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cuda, shape, seq, batch, warmup = workload(args)
    common = ["--device", args.device, "--shape", shape, "--seq", str(seq), "--batch", str(batch)]
    baseline = [sys.executable, str(HERE / "peft_baseline.py"), *common]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run([args.trainer, "fixture", "--out", str(work / "fixture")])
        run(baseline + ["--save-model", str(work / "model")])
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(work / "fixture/model" / name, work / "model" / name)
        job = write_job(work, seq, batch, warmup + args.steps)
        env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        if not cuda:
            env["OMP_NUM_THREADS"] = str(args.threads)
        peft, ours, machine = [], [], None
        for round_ in range(1, args.rounds + 1):
            report = json.loads(run(baseline + ["--steps", str(args.steps), "--threads", str(args.threads)]).splitlines()[-1])
            machine = report.get("gpu") or cpu_name()
            peft.append(report["tokens_per_s"])
            trained = subprocess.run([args.trainer, "train", "--spec", str(job), "--out", str(work / "out"),
                                      "--device", args.device], env=env, capture_output=True, text=True)
            if trained.returncode != 0:
                raise SystemExit(f"loraforge-trainer train failed:\n{trained.stderr}")
            ours.append(steady_rate(trained.stderr, json.loads(trained.stdout.splitlines()[-1]), warmup, batch * seq))
            print(f"round {round_}: PEFT {peft[-1]} tokens/s, loraforge {ours[-1]} tokens/s", file=sys.stderr)

    p, o = statistics.median(peft), statistics.median(ours)
    where = f"{args.threads} threads" if not cuda else "bf16 base, fp32 adapter"
    print(f"{datetime.date.today()}, {machine}, {where}, {shape} shape, batch {batch} x seq {seq}, "
          f"{args.steps} timed steps after {warmup} warm-up, median of {args.rounds} alternating rounds")
    print("| trainer | tokens/s (median) | each round |")
    print("|---|---|---|")
    print(f"| HF PEFT | {p:.1f} | {', '.join(f'{x:.1f}' for x in peft)} |")
    print(f"| loraforge | {o:.1f} | {', '.join(f'{x:.1f}' for x in ours)} |")
    print(f"| ratio loraforge/PEFT | {o / p:.3f} | |")


def workload(args) -> tuple:
    """(cuda, shape, seq, batch, warm-up steps) from --device/--shape/--seq/--batch and the defaults."""
    cuda = args.device == "cuda"
    shape = args.shape or ("tinyllama" if cuda else "small")
    seq = args.seq or (2048 if cuda else 256)
    batch = args.batch or ((8 if shape == "tinyllama" else 4) if cuda else 4)
    return cuda, shape, seq, batch, 3 if cuda else 2


def run(command: list) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.stdout


def write_job(work: Path, seq: int, batch: int, steps: int) -> Path:
    """Texts of seq/2 fixture sentences (each a few tokens or more), so every row is cut at seq."""
    sentences = [json.loads(line)["text"] for line in (work / "fixture/data/train.jsonl").open()]
    per_text = max(seq // 2, 40)
    with (work / "train.jsonl").open("w") as f:
        for i in range(64):
            text = " ".join(sentences[(i * 7 + k) % len(sentences)] for k in range(per_text))
            f.write(json.dumps({"text": text}) + "\n")
    job = {"adapter_name": "bench", "base_model": f"file://{work}/model",
           "dataset": {"train": f"file://{work}/train.jsonl"},
           "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
           "training": {"max_steps": steps, "learning_rate": 1e-4, "batch_size": batch, "seq_len": seq,
                        "max_grad_norm": None, "checkpoint_every": None}}
    path = work / "job.json"
    path.write_text(json.dumps(job))
    return path


def steady_rate(log: str, summary: dict, warmup: int, per_step: int) -> float:
    """tokens/s over the steps after warm-up, from the cumulative rate each progress line reports."""
    metrics = summary["metrics"]
    if metrics["tokens"] != metrics["steps"] * per_step:
        raise SystemExit(f"rows were not all full ({per_step} tokens a step expected): {metrics}")
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    rate = {int(s): float(r) for s, r in re.findall(r"progress step=(\d+) .*?tokens_per_second=([0-9.e+-]+)", log)}
    last = max(rate)

    def elapsed(step: int) -> float:
        return step * per_step / rate[step]

    return round((last - warmup) * per_step / (elapsed(last) - elapsed(warmup)), 1)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
