"""Runs PEFT's AdaLoRA on exactly the inputs of a loraforge AdaLoRA run and compares.

Usage: adalora_parity.py MODEL_DIR TRACE_DIR SPEC_JSON
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set: the adapter's
initial variables, every step's batch, and its final variables. PEFT starts from the same
triplets, trains on the same batches with torch's AdamW (the spec must use one micro-batch per
step, a constant learning rate, no clipping and no dropout), calling
`update_and_allocate(global_step)` after each optimizer step as its docs say.
Prints one JSON line: whether the kept triplets agree per module, and the largest absolute
difference between the two runs' delta weights B (A ⊙ E ⊙ keep) · alpha / (init_r + 1e-5).
"""
import json
import sys

import torch
from peft import AdaLoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(model_dir: str, trace_dir: str, spec_path: str) -> None:
    spec = json.load(open(spec_path))
    method, training = spec["method"], spec["training"]
    total_step = training["max_steps"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = AdaLoraConfig(
        init_r=method["init_r"], target_r=method["target_r"], tinit=method["tinit"], tfinal=method["tfinal"],
        deltaT=method.get("delta_t", 1), beta1=method.get("beta1", 0.85), beta2=method.get("beta2", 0.85),
        orth_reg_weight=method.get("orth_reg_weight", 0.5), total_step=total_step, lora_alpha=method["alpha"],
        lora_dropout=0.0, target_modules=method["target_modules"], task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()

    def rust_name(peft_name: str) -> str:
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default -> model.layers.0...q_proj.lora_A
        return peft_name.removeprefix("base_model.model.").removesuffix(".default").replace(".default.", ".")

    initial = load_file(f"{trace_dir}/initial.safetensors")
    params = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(initial[rust_name(name)])
                params[rust_name(name)] = p
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=training["learning_rate"],
        betas=(0.9, 0.999), eps=1e-8, weight_decay=training.get("weight_decay", 0.0),
    )
    batches = load_file(f"{trace_dir}/batches.safetensors")
    for step in range(1, total_step + 1):
        ids, labels = batches[f"step{step}.micro0.input_ids"], batches[f"step{step}.micro0.labels"]
        # loraforge's labels are already shifted (label t is the target of position t); Hugging
        # Face shifts them itself, so prepend an ignored label and append a token no target sees.
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        loss = model(input_ids=hf_ids, labels=hf_labels).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step - 1)
        optimizer.zero_grad()

    final = load_file(f"{trace_dir}/final.safetensors")
    pattern = model.peft_config["default"].rank_pattern or {}
    scale = method["alpha"] / (method["init_r"] + 1e-5)
    modules = sorted({n.rsplit(".", 1)[0] for n in params})
    kept_match, max_diff, max_delta, kept = True, 0.0, 0.0, {}
    for m in modules:
        key = next((k for k in pattern if rust_name(k) == f"{m}.lora_E"), None)
        peft_keep = torch.tensor(pattern[key]) if key else torch.ones(method["init_r"], dtype=torch.bool)
        rust_keep = final[f"{m}.keep"].view(-1) > 0.5
        kept_match &= bool(torch.equal(peft_keep, rust_keep))
        kept[m] = [int(peft_keep.sum()), int(rust_keep.sum())]
        with torch.no_grad():
            ours = final[f"{m}.lora_B"] @ (final[f"{m}.lora_A"] * final[f"{m}.lora_E"] * rust_keep.view(-1, 1)) * scale
            theirs = params[f"{m}.lora_B"] @ (params[f"{m}.lora_A"] * params[f"{m}.lora_E"] * peft_keep.view(-1, 1)) * scale
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
        max_delta = max(max_delta, theirs.abs().max().item())
    print(json.dumps({"kept_match": kept_match, "kept": kept, "max_abs_diff": max_diff, "max_abs_delta": max_delta}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
