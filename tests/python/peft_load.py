"""Loads a loraforge adapter onto its base model with Hugging Face PEFT.

Usage: peft_load.py MODEL_DIR ADAPTER_DIR
Prints one JSON line: the keys PEFT did not expect, the LoRA keys it missed, how many
LoRA tensors it loaded, and how much the adapter moves the logits of a fixed input.
"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(model_dir: str, adapter_dir: str) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tokens = torch.tensor([[1, 5, 9, 14, 20, 33, 41, 2]]) % base.config.vocab_size
    with torch.no_grad():
        base_logits = base(tokens).logits.clone()

    config = LoraConfig.from_pretrained(adapter_dir)
    model = get_peft_model(base, config).eval()
    state = load_file(f"{adapter_dir}/adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state)
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    with torch.no_grad():
        adapted_logits = model(tokens).logits
    print(json.dumps({
        "unexpected_keys": list(result.unexpected_keys),
        "missing_lora_keys": missing_lora,
        "lora_tensors": len(state),
        "max_logit_change": (adapted_logits - base_logits).abs().max().item(),
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
