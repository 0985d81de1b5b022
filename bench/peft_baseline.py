"""HF PEFT LoRA training throughput: the baseline loraforge is compared with (bench/README.md).

The setup of the PEFT baseline scripts the project started from (a CPU and a GPU benchmark),
kept here so the benchmarks run from a clone. A Llama with random weights (throughput does not depend on them), LoRA r=16
alpha=32 on all seven projections, AdamW, random token ids as input and labels.
  --device cpu:  the small shape (hidden 512, 8 layers, 8/4 heads, intermediate 1408, vocab
                 8192) in fp32, --threads intra-op threads, 2 warm-up steps.
  --device cuda: TinyLlama-1.1B or Llama-3-8B shape in bf16, sdpa, fused AdamW, 3 warm-up steps.

Usage: python3 peft_baseline.py [--device cpu|cuda] [--shape small|tinyllama|llama3-8b] [--seq N]
                                [--batch N] [--steps 10] [--threads 2] [--save-model DIR]
                                [--liger] [--gradient-checkpointing]
Prints one JSON object. --save-model writes the model (config and safetensors, bf16 on CUDA)
with save_pretrained and exits, so loraforge can train exactly this model.
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ap = argparse.ArgumentParser()
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--shape", choices=SHAPES, default=None)
ap.add_argument("--seq", type=int, default=None)
ap.add_argument("--batch", type=int, default=None)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--save-model", default=None)
ap.add_argument("--layers", type=int, default=None,
                help="fewer decoder layers than the shape has: the same per-layer work, for a profile")
ap.add_argument("--liger", action="store_true",
                help="patch the model with Liger Kernel (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)")
ap.add_argument("--gradient-checkpointing", action="store_true",
                help="recompute each decoder layer in the backward pass (transformers' checkpointing)")
args = ap.parse_args()
if args.liger:
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
cuda = args.device == "cuda"
shape = args.shape or ("tinyllama" if cuda else "small")
seq = args.seq or (2048 if cuda else 256)
batch = args.batch or ((8 if shape == "tinyllama" else 4) if cuda else 4)
warmup = 3 if cuda else 2
if not cuda:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
# The position range covers the sequence (the long-context row trains past the shape's own).
shape_cfg = dict(SHAPES[shape])
shape_cfg["max_position_embeddings"] = max(shape_cfg["max_position_embeddings"], seq)
if args.layers:
    shape_cfg["num_hidden_layers"] = args.layers
cfg = LlamaConfig(attn_implementation="sdpa", **shape_cfg)
if cuda:
    torch.set_default_dtype(torch.bfloat16)
with torch.device(args.device):
    model = LlamaForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
if args.save_model:
    model.save_pretrained(args.save_model)
    raise SystemExit(0)
n_params = sum(p.numel() for p in model.parameters())
if args.gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=cuda)
x = torch.randint(0, cfg.vocab_size, (batch, seq), device=args.device)


def step():
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync():
    if cuda:
        torch.cuda.synchronize()


for _ in range(warmup):
    step()
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for _ in range(args.steps):
    step()
sync()
dt = time.perf_counter() - t0
report = {"device": args.device, "shape": shape, "params": n_params, "seq": seq, "batch": batch,
          "tokens_per_s": round(args.steps * batch * seq / dt, 1), "step_s": round(dt / args.steps, 4),
          "torch": torch.__version__}
if cuda:
    report["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["gpu"] = torch.cuda.get_device_name()
else:
    report["threads"] = args.threads
print(json.dumps(report))
