"""Runs PEFT's EVA initialisation on exactly the batches of a loraforge EVA run's data pass and
compares the initial adapters.

Usage: eva_parity.py MODEL_DIR TRACE_DIR SPEC_JSON
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set: the adapter's
variables after the data pass (`initial.safetensors`: `lora_A` with `eva_rank` live rows,
`eva_scale`) and the data pass's batches (`calibration.batch<K>.{input_ids,labels}`). PEFT gets
the same batches as its dataloader, in transformers' layout: loraforge's labels are the next
token's (label t is the target after position t), so PEFT's label at t is loraforge's at t - 1.
Prints one JSON line: per module PEFT's rank and ours, PEFT's scale and ours, and the largest
absolute difference between the A matrices, each row's sign taken from PEFT's.
"""
import json
import sys

import torch
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def hf_batch(ids: torch.Tensor, labels: torch.Tensor) -> dict:
    ignored = torch.full_like(labels[:, :1], -100)
    hf_labels = torch.cat([ignored, labels[:, :-1]], dim=1)
    # Real tokens: every position up to the token the row's last target predicts (rows are
    # right-padded and every example ends on a target), as loraforge reads them.
    target = labels != -100
    later = target.flip(1).cumsum(1).flip(1) > 0
    attention = torch.cat([later[:, :1], later[:, :-1]], dim=1).long()
    return {"input_ids": ids, "attention_mask": attention, "labels": hf_labels}


def main(model_dir: str, trace_dir: str, spec_path: str) -> None:
    spec = json.load(open(spec_path))
    method = spec["method"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=method["r"], lora_alpha=method["alpha"], lora_dropout=0.0, target_modules=method["target_modules"],
        init_lora_weights="eva", task_type="CAUSAL_LM",
        eva_config=EvaConfig(
            rho=method.get("rho", 2.0), tau=method.get("tau", 0.99),
            use_label_mask=method.get("use_label_mask", True), whiten=method.get("whiten", False),
            adjust_scaling_factors=method.get("adjust_scaling_factors", True),
        ),
    )
    model = get_peft_model(base, config)
    batches = load_file(f"{trace_dir}/batches.safetensors")
    count = sum(1 for k in batches if k.startswith("calibration.") and k.endswith(".input_ids"))
    dataloader = [
        hf_batch(batches[f"calibration.batch{k}.input_ids"], batches[f"calibration.batch{k}.labels"])
        for k in range(count)
    ]
    initialize_lora_eva_weights(model, dataloader=dataloader, show_progress_bar=False)

    initial = load_file(f"{trace_dir}/initial.safetensors")
    modules = sorted({k.rsplit(".", 1)[0] for k in initial if k.endswith(".eva_rank")})
    peft_layers = {
        name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    ranks, scales, max_diff = {}, {}, 0.0
    for m in modules:
        ours_rank = int(round(initial[f"{m}.eva_rank"].item()))
        ours_a = initial[f"{m}.lora_A"][:ours_rank]
        layer = peft_layers.get(m)
        if layer is None:
            theirs_rank, theirs_a, theirs_scale = 0, torch.zeros(0, ours_a.shape[1]), 0.0
        else:
            theirs_a = layer.lora_A["default"].weight.detach()
            theirs_rank, theirs_scale = theirs_a.shape[0], float(layer.scaling["default"])
        ranks[m] = [theirs_rank, ours_rank]
        scales[m] = [theirs_scale, float(initial[f"{m}.eva_scale"].item())]
        if theirs_rank == ours_rank and ours_rank > 0:
            signs = torch.sign((ours_a * theirs_a).sum(1, keepdim=True))
            max_diff = max(max_diff, (ours_a * signs - theirs_a).abs().max().item())
    peft_config = model.peft_config["default"]
    print(json.dumps({
        "ranks": ranks, "scales": scales, "max_abs_diff": max_diff,
        "rank_pattern": peft_config.rank_pattern, "alpha_pattern": peft_config.alpha_pattern,
        "batches": count,
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
