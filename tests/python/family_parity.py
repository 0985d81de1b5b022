"""Runs PEFT's MiSS or SHiRA on exactly the inputs of a loraforge run and compares.

Usage: family_parity.py MODEL_DIR TRACE_DIR SPEC_JSON ADAPTER_DIR MERGED_DIR TOKENS
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set (the adapter's
initial variables, every step's batch, its final variables); ADAPTER_DIR is the adapter it
published; MERGED_DIR is where this script writes PEFT's `merge_and_unload` of that adapter.
PEFT's model is built from the job's method (MissConfig / ShiraConfig, the same knobs), starts
from loraforge's initial variables, and trains on the same batches with torch's AdamW (the spec
must use one micro-batch per step, a constant learning rate, no clipping and no dropout).
Prints one JSON line:
- positions_match (SHiRA): PEFT's own mask for the seed is loraforge's;
- max_abs_diff / max_abs_param: between the two runs' trained variables, and their largest entry;
- logits: PEFT's logits of the published adapter (PeftModel.from_pretrained) for TOKENS;
- merged_logits: the logits of PEFT's merge_and_unload of it (saved to MERGED_DIR).
"""
import json
import sys

import torch
from peft import MissConfig, PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def peft_config(method: dict, seed: int):
    if method["type"] == "miss":
        init = {"balance": True, "bat": "bat", "mini": "mini"}[method.get("init", "balance")]
        return MissConfig(r=method.get("r", 64), miss_dropout=0.0, mini_r=method.get("mini_r", 1),
                          init_weights=init, target_modules=method["target_modules"], task_type="CAUSAL_LM")
    if method["type"] == "shira":
        return ShiraConfig(r=method.get("r", 32), random_seed=method.get("random_seed", seed),
                           target_modules=method["target_modules"], task_type="CAUSAL_LM")
    raise SystemExit(f"unknown method {method['type']}")


def rust_name(peft_name: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.miss_block.default -> model.layers.0...q_proj.miss_block
    return peft_name.removeprefix("base_model.model.").removesuffix(".default")


def main(model_dir, trace_dir, spec_path, adapter_dir, merged_dir, tokens) -> None:
    spec = json.load(open(spec_path))
    method, training = spec["method"], spec["training"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, peft_config(method, training.get("seed", 0)))
    model.train()

    initial = load_file(f"{trace_dir}/initial.safetensors")
    result = {}
    if method["type"] == "shira":
        match = True
        for name, module in model.named_modules():
            if hasattr(module, "shira_indices") and "default" in module.shira_indices:
                ours = initial[f"{rust_name(name)}.shira_indices"].to(torch.int64)
                theirs = module.shira_indices["default"].to(torch.int64)
                match &= ours.shape == theirs.shape and bool(torch.equal(ours, theirs))
                module.shira_indices["default"] = ours.to(torch.int)
        result["positions_match"] = match

    params = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(initial[rust_name(name)])
                params[rust_name(name)] = p
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=training["learning_rate"],
        betas=(0.9, 0.999), eps=1e-8, weight_decay=training.get("weight_decay", 0.0),
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

    final = load_file(f"{trace_dir}/final.safetensors")
    with torch.no_grad():
        result["max_abs_diff"] = max((final[n] - p).abs().max().item() for n, p in params.items())
        result["max_abs_param"] = max(p.abs().max().item() for p in params.values())

    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    fresh = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    published = PeftModel.from_pretrained(fresh, adapter_dir).eval()
    with torch.no_grad():
        result["logits"] = published(ids).logits[0].tolist()
    merged = published.merge_and_unload().eval()
    with torch.no_grad():
        result["merged_logits"] = merged(ids).logits[0].tolist()
    merged.save_pretrained(merged_dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:7])
