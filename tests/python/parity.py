"""The Hugging Face side of the parity tests (tests/tests/parity.rs).

Usage:
  parity.py make KIND FIXTURE_DIR OUT_DIR
      Writes a tiny random-weight model of KIND with transformers' save_pretrained, plus the
      fixture's tokenizer (its vocabulary sizes the model), and prints {"vocab_size": N}.
  parity.py logits MODEL_DIR ADAPTER_DIR TOKENS
      Loads the base in fp32 with transformers (bf16 weights are upcast, as loraforge does on
      the CPU), puts the adapter on it with PEFT, and prints one JSON line with the logits of
      the comma-separated TOKENS with and without the adapter, and the keys PEFT did not take.

Kinds (all GQA: 4 query heads over 2 key/value heads):
  llama         Llama, config.json in the transformers 4 layout (top-level rope_theta)
  qwen2         Qwen2: q/k/v bias, tied embeddings, transformers 5 layout (rope_parameters)
  llama3-rope   Llama with llama3 rope scaling in rope_parameters (transformers 5 layout)
  llama3-rope-v4  the same scaling as transformers 4 wrote it (rope_scaling + rope_theta)
  sharded-bf16  Llama saved in bf16, split into several shards with an index
  mistral-window  Mistral with a sliding window shorter than the test sequences
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256,
             # Wide enough that attention is far from uniform and the logits spread over a few
             # units: then RoPE, masks and biases all move the logits measurably.
             initializer_range=0.1)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0,
                   # With head_dim 16 and this context, the wavelengths fall in all three bands (kept,
                   # interpolated, stretched), and the test's 40 positions turn the stretched ones visibly.
                   original_max_position_embeddings=64)


def build(kind: str, special: dict):
    common = dict(SHAPE, **special)
    if kind in ("llama", "sharded-bf16"):
        return LlamaForCausalLM(LlamaConfig(**common, rope_parameters=dict(rope_type="default", rope_theta=20000.0)))
    if kind in ("llama3-rope", "llama3-rope-v4"):
        return LlamaForCausalLM(LlamaConfig(**common, rope_parameters=dict(LLAMA3_ROPE)))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    if kind == "mistral-window":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=8))
    raise SystemExit(f"unknown kind {kind}")


def make(kind: str, fixture_dir: str, out_dir: str) -> None:
    fixture_model = Path(fixture_dir) / "model"
    fixture_config = json.loads((fixture_model / "config.json").read_text())
    special = {k: fixture_config[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    model = build(kind, special).eval()
    with torch.no_grad():
        # transformers starts norms at one and biases at zero; random values show that each
        # lands where it belongs.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.2)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    out = Path(out_dir)
    if kind == "sharded-bf16":
        model.to(torch.bfloat16).save_pretrained(out, max_shard_size="100KB")
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file(), shards
    else:
        model.save_pretrained(out)
    if kind in ("llama", "llama3-rope-v4"):
        to_transformers4_layout(out / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_model / name, out / name)
    print(json.dumps({"vocab_size": special["vocab_size"]}))


def to_transformers4_layout(path: Path) -> None:
    """Rewrites rope_parameters as transformers 4.45+ wrote it: rope_theta at the top level,
    the scaling (if any) in rope_scaling under the pre-4.45 key `type`."""
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    if kind != "default":
        config["rope_scaling"] = dict(rope, type=kind)
    config["torch_dtype"] = config.pop("dtype")
    path.write_text(json.dumps(config, indent=2))


def logits(model_dir: str, adapter_dir: str, tokens: str) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in base.parameters())
    with torch.no_grad():
        base_logits = base(ids).logits[0].clone()
    model = get_peft_model(base, LoraConfig.from_pretrained(adapter_dir)).eval()
    state = load_file(f"{adapter_dir}/adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state)
    with torch.no_grad():
        adapted = model(ids).logits[0]
    print(json.dumps({
        "logits": adapted.tolist(),
        "base_logits": base_logits.tolist(),
        "unexpected_keys": list(result.unexpected_keys),
        "missing_lora_keys": [k for k in result.missing_keys if "lora_" in k],
        "lora_tensors": len(state),
    }))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"make": make, "logits": logits}[command](*args)
