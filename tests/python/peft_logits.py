"""Logits of a model, with a PEFT adapter applied by PEFT itself when one is given.

Usage: peft_logits.py MODEL_DIR TOKENS [ADAPTER_DIR]
Prints one JSON line: {"logits": [[float]]} for the comma-separated token ids, fp32 on the CPU,
and "key_warnings": PEFT's warnings about adapter keys it missed or did not expect.
"""
import json
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(model_dir: str, tokens: str, adapter_dir: str | None) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if adapter_dir:
            model = PeftModel.from_pretrained(model, adapter_dir).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message)]
    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    print(json.dumps({"logits": logits.tolist(), "key_warnings": key_warnings}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
