"""The data-driven initialisations' references, on exactly the calibration batches of a
loraforge run, and the published adapter against the trained model.

Usage: init_reference.py MODEL_DIR TRACE_DIR SPEC_JSON ADAPTER_DIR TOKENS
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set: the adapter's
variables after calibration (`initial.safetensors`), the calibration batches
(`calibration.batch<K>.{input_ids,labels}`) and the variables after training
(`final.safetensors`).

- loraga: PEFT's own LoRA-GA (`preprocess_loraga` with a train step over the calibration
  batches, then `get_peft_model`), whose lora_A / lora_B are compared with loraforge's initial
  A / B up to the sign of each singular vector (A's and B's vectors are different ones).
- lorasb: the authors' math (CERT-Lab/lora-sb, `estimate_and_process_grads_torch`,
  `get_svd_grad`, `find_and_initialize_grad`) written out here: gradients summed over the
  batches with each batch's loss divided by its rows, dW = -lr * sign(sum), then per module
  seed 42, one discarded randn(out, r), svd_lowrank(dW^T, q=r, niter=10): A = U^T, B = V,
  R = diag(S). Compared with loraforge's initial A, B, R up to sign.

Then the trained model, rebuilt from the final variables on the original base
(loraga: W + s (B A - B0 A0); lorasb: W + B R A), against the original base with the
published adapter loaded by PEFT: the logits' largest difference.
Prints one JSON line.
"""
import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def calibration_batches(trace_dir):
    batches = load_file(f"{trace_dir}/batches.safetensors")
    out, k = [], 0
    while f"calibration.batch{k}.input_ids" in batches:
        ids, labels = batches[f"calibration.batch{k}.input_ids"], batches[f"calibration.batch{k}.labels"]
        # loraforge's labels are already shifted (label t is the target of position t); Hugging
        # Face shifts them itself, so prepend an ignored label and append a token no target sees.
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        out.append((hf_ids, hf_labels))
        k += 1
    return out


def modules_of(model, targets):
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets]


def sign_aligned_diff(ours, theirs, dim):
    """Largest difference after flipping each singular vector (row of A: dim 1; column of B:
    dim 0) of ours to agree with theirs; also returns the flips."""
    signs = torch.sign((ours * theirs).sum(dim=dim, keepdim=True))
    signs[signs == 0] = 1
    return (ours * signs - theirs).abs().max().item(), signs


def loraga(model_dir, trace_dir, method, initial):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(
        r=method["r"], lora_alpha=method.get("alpha", 8), target_modules=method["target_modules"],
        use_rslora=method.get("use_rslora", False), init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(direction=method.get("direction", "ArB2r"), scale=method.get("scale", "stable"),
                                    stable_gamma=method.get("stable_gamma", 16)),
        task_type="CAUSAL_LM",
    )
    batches = calibration_batches(trace_dir)

    def train_step():
        for ids, labels in batches:
            model(input_ids=ids, labels=labels).loss.backward()

    preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)
    worst = 0.0
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        path = name.removeprefix("base_model.model.")
        a, b = module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach()
        # A and B take different singular vectors (A right ones of one half, B left ones of the
        # other), so each vector's sign is free on its own.
        diff_a, _ = sign_aligned_diff(initial[f"{path}.lora_A"], a, 1)
        diff_b, _ = sign_aligned_diff(initial[f"{path}.lora_B"], b, 0)
        worst = max(worst, diff_a, diff_b)
    return worst, len(batches)


def lorasb(model_dir, trace_dir, method, training, initial):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    targets = method["target_modules"]
    for p in model.parameters():
        p.requires_grad_(False)
    modules = modules_of(model, targets)
    for _, m in modules:
        m.weight.requires_grad_(True)
    batches = calibration_batches(trace_dir)
    sums = {}
    for ids, labels in batches:
        (model(input_ids=ids, labels=labels).loss / ids.shape[0]).backward()
        for name, m in modules:
            sums[name] = sums.get(name, 0) + m.weight.grad.detach().clone()
            m.weight.grad = None
    # The test's schedule has no warmup: the first step's learning rate is the peak.
    lr = training["learning_rate"]
    r = method["r"]
    worst = 0.0
    for name, _ in modules:
        update = -lr * torch.sign(sums[name])
        torch.manual_seed(42)
        torch.randn(update.T.size(1), r)
        u, s, v = torch.svd_lowrank(update.T, q=r, niter=10)
        a, b, rr = u.T, v, torch.diag(s)
        diff_a, signs = sign_aligned_diff(initial[f"{name}.lora_A"], a, 1)
        diff_b = (initial[f"{name}.lora_B"] * signs.T - b).abs().max().item()
        # R's entry (i, j) flips with the signs of vectors i and j.
        diff_r = (signs * initial[f"{name}.lora_R"] * signs.T - rr).abs().max().item()
        worst = max(worst, diff_a, diff_b, diff_r)
    return worst, len(batches)


def rebuilt_logits(model_dir, kind, method, final, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in modules_of(model, method["target_modules"]):
            if kind == "loraga":
                r, alpha = method["r"], method.get("alpha", 8)
                s = alpha / r ** 0.5 if method.get("use_rslora", False) else alpha / r
                delta = s * (final[f"{name}.lora_B"] @ final[f"{name}.lora_A"]
                             - final[f"{name}.lora_B0"] @ final[f"{name}.lora_A0"])
            else:
                delta = final[f"{name}.lora_B"] @ final[f"{name}.lora_R"] @ final[f"{name}.lora_A"]
            m.weight += delta
        return model(ids).logits[0]


def main(model_dir, trace_dir, spec_path, adapter_dir, tokens):
    spec = json.load(open(spec_path))
    method, training = spec["method"], spec["training"]
    kind = method["type"]
    initial = load_file(f"{trace_dir}/initial.safetensors")
    final = load_file(f"{trace_dir}/final.safetensors")
    if kind == "loraga":
        init_diff, batches = loraga(model_dir, trace_dir, method, initial)
    else:
        init_diff, batches = lorasb(model_dir, trace_dir, method, training, initial)
    raw = load_file(f"{trace_dir}/batches.safetensors")
    first, step1 = raw["calibration.batch0.input_ids"], raw["step1.micro0.input_ids"]
    # With the job's batch size the calibration batches are the first steps' micro-batches.
    same_first = first.shape == step1.shape and bool(torch.equal(first, step1))
    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    trained = rebuilt_logits(model_dir, kind, method, final, ids)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits[0]
        published = PeftModel.from_pretrained(base, adapter_dir).eval()(ids).logits[0]
    print(json.dumps({
        "init_max_abs_diff": init_diff,
        "init_max_abs": max(t.abs().max().item() for k, t in initial.items() if k.endswith("lora_A")),
        "calibration_batches": batches,
        "first_batch_is_step1s": same_first,
        "logits_max_abs_diff": (trained - published).abs().max().item(),
        "trained_vs_base": (trained - base_logits).abs().max().item(),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:6])
