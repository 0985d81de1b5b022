"""Does loraforge's fast CUDA path train like PEFT? Both train the same bf16 model from the same
LoRA factors on the same batches, and their loss curves are compared step by step (issue #17's
correctness guard for the GPU path; bench/gpu.md reports the result).

Usage (on the GPU machine, with the trainer built on the development machine):
  python3 bench/loss_curve.py --trainer BIN [--shape tinyllama] [--seq 1024] [--batch 8]
                              [--steps 200] [--lr 1e-4] [--checkpointing none|layers|offload]
                              [--work DIR] [--json-out FILE] [--device cuda|cpu]
                              [--peft-from FILE]
(`--peft-from` takes PEFT's curve from an earlier run's --json-out on the same --work, its
arguments unchanged, so a second trainer build or setting is compared without training PEFT
again: the trace is the same, since the trainer's factors and batches follow from the seed.)
(`--device cpu --shape small` checks the script itself on a machine without a GPU: fp32 there.)

1. The model `peft_baseline.py --save-model` writes (random weights, bf16) and 64 texts of
   fixture sentences, as bench/gpu_bench.py uses.
2. loraforge trains it (LoRA r=16 alpha=32 on all seven projections, AdamW, constant learning
   rate, no clipping, no warm-up) with `LORAFORGE_TRACE_DIR` set, so it records its adapter's
   initial factors and every step's batch; its loss per step comes from its progress lines.
3. PEFT (the same LoRA, `torch.optim.AdamW(fused=True)`) starts from those factors and trains on
   those batches in that order; its loss per step is the model's loss.
Step 1's loss is the base model's (B starts at zero), so its agreement checks that both saw the
same tokens. Prints one JSON object: both curves, the final losses and their relative
difference, and the largest gap between the curves (raw, and as a 10-step moving average).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import TARGETS, run, write_job  # noqa: E402


def loraforge_curve(args, work: Path) -> list:
    job_path = write_job(work, args.seq, args.batch, args.steps)
    job = json.loads(job_path.read_text())
    job["training"].update({"learning_rate": args.lr, "schedule": "constant", "warmup_steps": 0,
                            "max_grad_norm": None, "weight_decay": 0.0,
                            "gradient_checkpointing": args.checkpointing})
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, NO_COLOR="1", RUST_LOG="info", LORAFORGE_TRACE_DIR=str(work / "trace"))
    done = subprocess.run([args.trainer, "train", "--spec", str(job_path), "--out", str(work / "out"),
                           "--device", args.device], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"loraforge failed:\n{done.stderr[-3000:]}")
    log = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)
    losses = {int(s): float(v) for s, v in re.findall(r"progress step=(\d+) .*?loss=([0-9.e+-]+)", log)}
    if sorted(losses) != list(range(1, args.steps + 1)):
        raise SystemExit(f"expected a progress line with a loss for every step, got steps {sorted(losses)[:5]}…")
    return [losses[s] for s in range(1, args.steps + 1)]


def peft_curve(args, work: Path) -> list:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cuda = args.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(args.device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    initial = load_file(work / "trace/initial.safetensors")
    params = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> model.layers.0…q_proj.lora_A
                p.copy_(initial[name.removeprefix("base_model.model.").replace(".default.weight", "")])
                params.append(p)
    assert len(params) == len(initial), f"{len(params)} PEFT factors, {len(initial)} in the trace"
    assert all(p.dtype == torch.float32 for p in params), "PEFT's factors are expected in fp32"
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda)
    batches = load_file(work / "trace/batches.safetensors")
    losses = []
    model.train()
    for step in range(1, args.steps + 1):
        ids = batches[f"step{step}.micro0.input_ids"].to(args.device)
        labels = batches[f"step{step}.micro0.labels"].to(args.device)
        # loraforge's labels are already shifted; Hugging Face shifts them itself.
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        loss = model(input_ids=hf_ids, labels=hf_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def moving_average(xs: list, window: int) -> list:
    return [sum(xs[i:i + window]) / window for i in range(len(xs) - window + 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", required=True)
    ap.add_argument("--shape", default="tinyllama")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--checkpointing", default="none")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--peft-from", default=None, help="an earlier --json-out whose PEFT curve to reuse")
    args = ap.parse_args()
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    run([args.trainer, "fixture", "--out", str(work / "fixture")])
    if not (work / "model/config.json").exists():
        run([sys.executable, str(HERE / "peft_baseline.py"), "--device", args.device, "--shape", args.shape,
             "--seq", str(args.seq), "--batch", str(args.batch), "--save-model", str(work / "model")])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (work / "model" / name).write_bytes((work / "fixture/model" / name).read_bytes())

    ours = loraforge_curve(args, work)
    if args.peft_from:
        earlier = json.loads(Path(args.peft_from).read_text())
        same = ("device", "shape", "seq", "batch", "steps", "lr")
        if any(earlier[k] != getattr(args, k) for k in same):
            raise SystemExit(f"--peft-from {args.peft_from} ran with other arguments ({same})")
        peft = earlier["peft"]
    else:
        peft = peft_curve(args, work)
    gaps = [abs(a - b) for a, b in zip(ours, peft)]
    smooth_gaps = [abs(a - b) for a, b in zip(moving_average(ours, 10), moving_average(peft, 10))]
    result = {
        "device": args.device, "shape": args.shape, "seq": args.seq, "batch": args.batch, "steps": args.steps, "lr": args.lr,
        "checkpointing": args.checkpointing,
        "first_loss": {"loraforge": ours[0], "peft": peft[0]},
        "final_loss": {"loraforge": ours[-1], "peft": peft[-1]},
        "final_relative_difference": abs(ours[-1] - peft[-1]) / peft[-1],
        "max_gap": max(gaps), "max_gap_step": gaps.index(max(gaps)) + 1,
        "max_gap_10_step_average": max(smooth_gaps, default=None),
        "loss_drop": {"loraforge": ours[0] - ours[-1], "peft": peft[0] - peft[-1]},
        "loraforge": ours, "peft": peft,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("loraforge", "peft")}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
