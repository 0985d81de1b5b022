"""What transformers makes of a GGUF file: the reference for `loraforge models import`.

Usage: gguf_reference.py GGUF_FILE TOKENS [TEXT ...]
  TOKENS  comma-separated token ids to run the model on
  TEXT    texts to tokenize

Loads the model (dequantized to float32) and the tokenizer straight from the GGUF, as
`from_pretrained(dir, gguf_file=name)` does (it needs the `gguf` package), and prints one
JSON line: {"logits": [[float]], "encodings": [[int]], "encodings_with_special": [[int]]}.
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(path: str, tokens: str, texts: list[str]) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    with torch.no_grad():
        logits = model(ids).logits[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    print(json.dumps({
        "logits": logits.tolist(),
        "encodings": [tokenizer.encode(t, add_special_tokens=False) for t in texts],
        "encodings_with_special": [tokenizer.encode(t, add_special_tokens=True) for t in texts],
    }))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
