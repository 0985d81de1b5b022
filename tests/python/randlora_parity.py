"""Runs PEFT's RandLoRA on exactly the inputs of a loraforge RandLoRA run and compares.

Usage: randlora_parity.py MODEL_DIR TRACE_DIR SPEC_JSON TOKENS
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set (initial and
final variables, every step's batches). The spec's method must give every RandLoRA field; its
training one micro-batch per step, a constant learning rate, no clipping and no dropout.

PEFT draws its own bases from `projection_prng_key` (compared with loraforge's bit for bit),
starts from loraforge's initial scalings, trains on the same batches with torch's AdamW, and its
parameters are compared with loraforge's final ones. Then, with loraforge's final scalings loaded,
PEFT's logits for TOKENS, and those of the model `merge_and_unload()` gives.
Prints one JSON line.
"""
import json
import sys

import torch
from peft import RandLoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def ours(peft_name: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.randlora_lambda.default
    #   -> model.layers.0.self_attn.q_proj.randlora_lambda
    return peft_name.removeprefix("base_model.model.").removesuffix(".default")


def main(model_dir: str, trace_dir: str, spec_path: str, tokens: str) -> None:
    spec = json.load(open(spec_path))
    method, training = spec["method"], spec["training"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = RandLoraConfig(
        r=method["r"], randlora_alpha=method["alpha"], randlora_dropout=method["dropout"],
        sparse=method["sparse"], very_sparse=method["very_sparse"],
        projection_prng_key=method["projection_prng_key"], save_projection=method["save_projection"],
        target_modules=method["target_modules"], task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()

    initial = load_file(f"{trace_dir}/initial.safetensors")
    final = load_file(f"{trace_dir}/final.safetensors")
    bases_diff = max(
        (model.base_model.randlora_A["default"] - initial["randlora_A"]).abs().max().item(),
        (model.base_model.randlora_B["default"] - initial["randlora_B"]).abs().max().item(),
    )
    params = {ours(n): p for n, p in model.named_parameters() if p.requires_grad}
    init_diff = max((p - initial[n]).abs().max().item() for n, p in params.items())
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(initial[n])

    optimizer = torch.optim.AdamW(
        list(params.values()), lr=training["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
        weight_decay=training.get("weight_decay", 0.0),
    )
    batches = load_file(f"{trace_dir}/batches.safetensors")
    for step in range(1, training["max_steps"] + 1):
        ids, labels = batches[f"step{step}.micro0.input_ids"], batches[f"step{step}.micro0.labels"]
        # loraforge's labels are already shifted (label t is the target of position t); Hugging
        # Face shifts them itself, so prepend an ignored label and append a token no target sees.
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        model(input_ids=hf_ids, labels=hf_labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    param_diff = {
        kind: max((p - final[n]).abs().max().item() for n, p in params.items() if n.endswith(kind))
        for kind in ("randlora_lambda", "randlora_gamma")
    }
    moved = {
        kind: max((final[n] - initial[n]).abs().max().item() for n in params if n.endswith(kind))
        for kind in ("randlora_lambda", "randlora_gamma")
    }

    # loraforge's trained scalings in PEFT: logits unmerged, then merged into the weights.
    model.eval()
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(final[n])
        ids = torch.tensor([[int(t) for t in tokens.split(",")]])
        logits = model(ids).logits[0]
        merged = model.merge_and_unload()
        merged_logits = merged(ids).logits[0]
    print(json.dumps({
        "bases_max_abs_diff": bases_diff, "init_max_abs_diff": init_diff,
        "param_max_abs_diff": param_diff, "moved": moved, "trained": sorted(params),
        "logits": logits.tolist(), "merged_logits": merged_logits.tolist(),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:5])
