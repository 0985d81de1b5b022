"""Adaptive-rank methods against LoRA on the fixture's learnable task (not a test).

Usage: python bench/methods/run.py TRAINER_BIN [STEPS]
Writes a fixture (`loraforge-trainer fixture`), trains each method with the same training
settings on CPU, and prints a Markdown table: final validation loss (the fixture's
validation.jsonl), trainable parameters during training, and parameters published.
Budgets are matched on the published rank: LoRA r=4; AdaLoRA 6 -> 4 per matrix; SoRA from
r=6 (gates prune); DyLoRA trained up to 6, published at 4.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

TARGETS = ["q_proj", "v_proj"]
METHODS = {
    "lora r=4": {"type": "lora", "r": 4, "alpha": 8},
    "adalora 6->4": {"type": "adalora", "init_r": 6, "target_r": 4, "alpha": 8, "tinit": 20, "tfinal": 40, "delta_t": 5},
    "sora r=6": {"type": "sora", "r": 6, "alpha": 8, "lambda": 0.01, "threshold": 1e-3},
    "dylora 6 (at 4)": {"type": "dylora", "r": 6, "export_r": 4, "alpha": 8},
}


def main(trainer: str, steps: int) -> None:
    work = Path(tempfile.mkdtemp())
    subprocess.run([trainer, "fixture", "--out", str(work)], check=True, capture_output=True)
    rows = []
    for name, method in METHODS.items():
        spec = {
            "adapter_name": "bench",
            "base_model": f"file://{work}/model",
            "dataset": {"train": f"file://{work}/data/train.jsonl", "validation": f"file://{work}/data/validation.jsonl"},
            "method": {**method, "target_modules": TARGETS},
            "training": {"max_steps": steps, "learning_rate": 0.005, "batch_size": 8, "seq_len": 64, "seed": 0,
                         "schedule": "linear", "warmup_steps": 10, "checkpoint_every": None},
        }
        out = work / name.split()[0]
        spec_path = out.with_suffix(".json")
        spec_path.write_text(json.dumps(spec))
        result = subprocess.run([trainer, "train", "--device", "cpu", "--spec", str(spec_path), "--out", str(out)],
                                check=True, capture_output=True, text=True)
        metrics = json.loads(result.stdout.strip().splitlines()[-1])["metrics"]
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            published = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
        ranks = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
        rank_text = "/".join(str(r) for r in ranks.values()) if ranks else "4 (all)"
        rows.append((name, metrics["eval_loss"], metrics["trainable_parameters"], published, rank_text))
    print(f"steps: {steps}, lr 0.005 linear (warmup 10), batch 8, seq 64, seed 0, targets {TARGETS}\n")
    print("| method | validation loss | trainable params | published params | published ranks (per module) |")
    print("|---|---|---|---|---|")
    for name, loss, trainable, published, ranks in rows:
        print(f"| {name} | {loss:.4f} | {trainable} | {published} | {ranks} |")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 150)
