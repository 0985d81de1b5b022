"""The tensors PEFT itself would publish for an adapter's config, next to those the adapter has.

Usage: peft_state_keys.py MODEL_DIR ADAPTER_DIR
Builds a fresh PEFT model of the adapter's `adapter_config.json` (any PEFT family) on the base
model and takes the state dict `save_pretrained` writes. Prints one JSON line:
{"peft": {key: shape}, "adapter": {key: shape}}.
"""
import json
import sys

import torch
from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from transformers import AutoModelForCausalLM


def main(model_dir: str, adapter_dir: str) -> None:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = False
    state = get_peft_model_state_dict(get_peft_model(base, config))
    with safe_open(f"{adapter_dir}/adapter_model.safetensors", "pt") as f:
        ours = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    print(json.dumps({"peft": {k: list(v.shape) for k, v in state.items()}, "adapter": ours}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
