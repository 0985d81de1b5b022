"""Runs a gradient-rule method's reference update on exactly the inputs of a loraforge run.

Usage: gradrule_parity.py MODEL_DIR TRACE_DIR SPEC_JSON
TRACE_DIR is what `loraforge-trainer train` wrote with LORAFORGE_TRACE_DIR set: the adapter's
initial variables, every step's batch, and its final variables. A PEFT LoRA (same rank, alpha,
modules, no dropout) starts from the same factors and trains on the same batches (the spec
must use one micro-batch per step and a constant learning rate without warmup) with the
method's update rule, written here from the reference's math:

- lorapro: `lorapro_full_adjustment` of mrflogs/LoRA-Pro (DeepSpeed-0.15.1/deepspeed/runtime/
  zero/stage_1_and_2.py): the closed-form adjustment, Adam on the equivalent full gradient,
  the projection back with the Sylvester term, then DeepSpeed's clipping by the raw gradients'
  norm and the outer `torch.optim.SGD`. Adam's bias corrections count steps from 1 (see
  services/trainer/src/methods/lorapro.rs for where this differs from the released file).
  The Sylvester equation is solved here through its Kronecker form, not loraforge's
  eigendecomposition.
- allora: PEFT's LoRA with scale 1 (lora_alpha = r) and no dropout; after each backward pass
  the factors' gradients are replaced by those of the output gradient scaled per output row by
  1 / sqrt(‖(BA)_i‖ + 1/η²) (arXiv 2410.09692v1, Section 4.2 and Listing 1: the row's norm, not
  squared), formed here from hooked inputs and output gradients (loraforge gets them from
  autograd), then `clip_grad_norm_` and torch's AdamW.
- lora_ggpo: kohya-ss/sd-scripts' LoRA-GGPO (networks/lora_flux.py): from the second step on,
  every adapted layer's output gets `x εᵀ`, ε ~ N(0, 1) per entry times
  (σ c_i + β g_i²)/√out per row, with c and g from the previous step's factors and clipped
  gradients; torch's AdamW. The noise is drawn from the same generator states as loraforge's
  (the per-micro-batch seed of services/trainer/src/training/seeds.rs, then one seed per layer
  as the trainer's model draws them), so both runs perturb identically.

Prints one JSON line: the largest absolute difference between the two runs' final factors and
the largest change of a factor over the run (so a run that did not train is visible).
"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def rust_name(peft_name: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> model.layers.0...q_proj.lora_A
    return peft_name.removeprefix("base_model.model.").replace(".default.weight", "")


def sylvester(p: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """X with p X + X q = c: (I ⊗ p + qᵀ ⊗ I) vec(X) = vec(c), vec stacking columns."""
    r = p.shape[0]
    eye = torch.eye(r, dtype=p.dtype)
    k = torch.kron(eye, p.contiguous()) + torch.kron(q.T.contiguous(), eye)
    x = torch.linalg.solve(k, c.T.reshape(-1))
    return x.reshape(r, r).T


def lorapro_adjust(a, b, ga, gb, s, with_x):
    delta = 1e-8
    r = a.shape[0]
    eye_r = torch.eye(r, dtype=a.dtype)
    aat, btb = a @ a.T, b.T @ b
    aat_inv = torch.linalg.pinv(aat + delta * eye_r)
    btb_inv = torch.linalg.pinv(btb + delta * eye_r)
    eye_out = torch.eye(b.shape[0], dtype=a.dtype)
    grad_a = (1 / s**2) * btb_inv @ ga
    grad_b = (1 / s**2) * ((eye_out - b @ btb_inv @ b.T) @ gb @ aat_inv)
    if with_x:
        x = sylvester(btb, aat, -(1 / s**2) * btb_inv @ ga @ a.T)
        grad_a = grad_a + x @ a
        grad_b = grad_b - b @ x
    return grad_a, grad_b


def main(model_dir: str, trace_dir: str, spec_path: str) -> None:
    spec = json.load(open(spec_path))
    method, training = spec["method"], spec["training"]
    kind = method["type"]
    assert kind in ("lorapro", "allora", "lora_ggpo"), kind
    r, alpha = method.get("r", 8), method.get("alpha", 16.0)
    if kind == "allora":
        alpha = r
    if kind == "lora_ggpo":
        alpha = method.get("alpha", 8.0)
    rslora = method.get("use_rslora", False)
    s = alpha / (r**0.5 if rslora else r)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=method["target_modules"],
        use_rslora=rslora, task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()

    initial = load_file(f"{trace_dir}/initial.safetensors")
    params = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(initial[rust_name(name)])
                params[rust_name(name)] = p
    modules = sorted({n.rsplit(".", 1)[0] for n in params})
    lr, wd = training["learning_rate"], training.get("weight_decay", 0.0)
    max_norm = training.get("max_grad_norm", 1.0)
    beta1, beta2 = 0.9, 0.999
    exp_avg, exp_avg_sq = {}, {}
    if kind == "allora":
        return allora(model, params, modules, method["eta"], training, initial, trace_dir)
    if kind == "lora_ggpo":
        return ggpo(model, params, modules, method, s, training, initial, trace_dir)
    batches = load_file(f"{trace_dir}/batches.safetensors")
    for step in range(1, training["max_steps"] + 1):
        ids, labels = batches[f"step{step}.micro0.input_ids"], batches[f"step{step}.micro0.labels"]
        # loraforge's labels are already shifted; Hugging Face shifts them itself.
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        model.zero_grad()
        model(input_ids=hf_ids, labels=hf_labels).loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in params.values()]
            total = torch.stack([g.norm() for g in grads]).norm()
            for m in modules:
                a, b = params[f"{m}.lora_A"], params[f"{m}.lora_B"]
                ga, gb = lorapro_adjust(a, b, a.grad, b.grad, s, with_x=False)
                equiv = s * b @ ga + s * gb @ a
                if m not in exp_avg:
                    exp_avg[m] = (1 - beta1) * equiv
                    exp_avg_sq[m] = (1 - beta2) * equiv * equiv
                else:
                    exp_avg[m].lerp_(equiv, 1 - beta1)
                    exp_avg_sq[m].mul_(beta2).addcmul_(equiv, equiv, value=1 - beta2)
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                g = (exp_avg[m] / bc1) / (exp_avg_sq[m].sqrt() / bc2**0.5 + 1e-8)
                ga, gb = lorapro_adjust(a, b, s * b.T @ g, s * g @ a.T, s, with_x=True)
                a.grad.copy_(ga)
                b.grad.copy_(gb)
            if max_norm is not None:
                coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
                for g in grads:
                    g.mul_(coefficient)
            for p in params.values():
                p.add_(p.grad + wd * p, alpha=-lr)

    report(params, initial, trace_dir)


def allora(model, params, modules, eta, training, initial, trace_dir):
    inputs, out_grads = {}, {}
    layers = {rust_name(n + ".lora_A.default.weight").rsplit(".", 1)[0]: mod
              for n, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}

    def hook(name):
        def forward(module, args, output):
            inputs[name] = args[0].detach()
            output.register_hook(lambda g: out_grads.__setitem__(name, g.detach()))
        return forward

    for name, layer in layers.items():
        layer.register_forward_hook(hook(name))
    optimizer = torch.optim.AdamW(list(params.values()), lr=training["learning_rate"], betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=training.get("weight_decay", 0.0))
    max_norm = training.get("max_grad_norm", 1.0)
    batches = load_file(f"{trace_dir}/batches.safetensors")
    for step in range(1, training["max_steps"] + 1):
        ids, labels = batches[f"step{step}.micro0.input_ids"], batches[f"step{step}.micro0.labels"]
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        optimizer.zero_grad()
        model(input_ids=hf_ids, labels=hf_labels).loss.backward()
        with torch.no_grad():
            for m in modules:
                a, b = params[f"{m}.lora_A"], params[f"{m}.lora_B"]
                x = inputs[m].reshape(-1, a.shape[1])
                delta = out_grads[m].reshape(-1, b.shape[0])
                s = 1.0 / torch.sqrt((b @ a).norm(dim=1) + 1.0 / eta**2)
                scaled = delta * s
                a.grad.copy_(b.T @ scaled.T @ x)
                b.grad.copy_(scaled.T @ (x @ a.T))
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        optimizer.step()
    report(params, initial, trace_dir)


MASK = (1 << 64) - 1


def derive_seed(seed: int, purpose: int, index: int) -> int:
    """services/trainer/src/training/seeds.rs: SplitMix64's finalizer over seed, purpose, index."""
    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)
    z = seed
    for word in (purpose, index):
        z = mix((z + word * 0x9E3779B97F4A7C15) & MASK)
    return z


def ggpo(model, params, modules, method, s, training, initial, trace_dir):
    sigma, beta = method.get("sigma", 0.03), method.get("beta", 0.01)
    layers = {rust_name(n + ".lora_A.default.weight").rsplit(".", 1)[0]: mod
              for n, mod in model.named_modules() if hasattr(mod, "lora_A") and "default" in mod.lora_A}
    base_norm = {m: layers[m].base_layer.weight.float().norm(dim=1).mean() for m in modules}
    noise_scale = {}

    def perturb(name):
        def forward(module, args, output):
            if name not in noise_scale:
                return output
            x = args[0]
            with torch.no_grad():
                eps = torch.randn(noise_scale[name].shape[0], x.shape[-1]) * noise_scale[name]
                perturbation = x @ eps.T
            return output + perturbation
        return forward

    for name, layer in layers.items():
        layer.register_forward_hook(perturb(name))
    seeds = []
    decoder = model.base_model.model.model.layers
    def reseed(i):
        def pre_forward(module, args):
            torch.manual_seed(seeds[i])  # as the trainer sets each layer's seed
        return pre_forward

    for i, block in enumerate(decoder):
        block.register_forward_pre_hook(reseed(i))
    optimizer = torch.optim.AdamW(list(params.values()), lr=training["learning_rate"], betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=training.get("weight_decay", 0.0))
    max_norm = training.get("max_grad_norm", 1.0)
    accumulation = training.get("gradient_accumulation_steps", 1)
    batches = load_file(f"{trace_dir}/batches.safetensors")
    for step in range(1, training["max_steps"] + 1):
        ids, labels = batches[f"step{step}.micro0.input_ids"], batches[f"step{step}.micro0.labels"]
        hf_ids = torch.cat([ids, ids[:, -1:]], dim=1)
        hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
        optimizer.zero_grad()
        torch.manual_seed(derive_seed(training["seed"], 3, step * accumulation))
        seeds[:] = torch.randint(2**63 - 1, (len(decoder),), dtype=torch.int64).tolist()
        model(input_ids=hf_ids, labels=hf_labels).loss.backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        with torch.no_grad():
            for m in modules:
                a, b = params[f"{m}.lora_A"], params[f"{m}.lora_B"]
                product = b @ a
                combined = torch.sqrt(base_norm[m] ** 2 + (product**2).sum(dim=1, keepdim=True))
                g = (s * (b @ a.grad + b.grad @ a)).norm(dim=1, keepdim=True)
                noise_scale[m] = (sigma * combined + beta * g**2) / b.shape[0] ** 0.5
        optimizer.step()
    report(params, initial, trace_dir)


def report(params, initial, trace_dir):
    final = load_file(f"{trace_dir}/final.safetensors")
    max_diff = max((final[n] - p.detach()).abs().max().item() for n, p in params.items())
    max_change = max((p.detach() - initial[n]).abs().max().item() for n, p in params.items())
    largest = max(p.detach().abs().max().item() for p in params.values())
    print(json.dumps({"max_abs_diff": max_diff, "max_abs_change": max_change, "largest": largest}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
