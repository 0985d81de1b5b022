"""What a LoRA step's fixed work costs on this GPU at a model shape: the frozen weights' matrix
products (forward and input gradient: no weight gradient), attention's forward and backward,
and what the adapter's rank-sized products add beside them, each timed alone with CUDA events.
A trainer's step time minus this floor is what its elementwise work and launches cost
(bench/gpu.md, "The floor"). It also times the product with the adapter's `B` folded in as
extra columns of the input (`[x, h] [W, B]^T`, K grown by the rank), against the base product
and the separate accumulate it replaces, and the order the trainer adopted in the sixth round: the
branch's product first, the frozen product accumulated onto it in place (beta 1), against the
frozen product first and the branch accumulated onto it (a third pass over the output).

    python3 bench/gemm_floor.py --shape llama3-8b --seq 2048 --batch 2
"""

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "tinyllama": (2048, 5632, 22, 32, 4, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b", choices=SHAPES)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--json-out")
    args = p.parse_args()
    hidden, inter, layers, heads, kvh, vocab = SHAPES[args.shape]
    hd = hidden // heads
    tokens = args.seq * args.batch
    r = args.rank
    dev, bf = "cuda", torch.bfloat16
    rows = []

    def gemm(name, k, n, count, extra_k=0):
        x = torch.randn(tokens, k + extra_k, device=dev, dtype=bf)
        w = torch.randn(n, k + extra_k, device=dev, dtype=bf) * 0.02
        dy = torch.randn(tokens, n, device=dev, dtype=bf)
        fwd = timed(lambda: x @ w.t())
        bwd = timed(lambda: dy @ w)
        flops = 2 * tokens * k * n
        rows.append({"product": name, "k_extra": extra_k, "count": count,
                     "forward_ms": fwd, "input_grad_ms": bwd,
                     "tflops_forward": flops / fwd / 1e9, "tflops_input_grad": flops / bwd / 1e9})
        return (fwd + bwd) * count

    total = 0.0
    products = [("qkv", hidden, hidden + 2 * kvh * hd, 3), ("o", hidden, hidden, 1),
                ("gate_up", hidden, 2 * inter, 2), ("down", inter, hidden, 1)]
    for name, k, n, parts in products:
        total += gemm(name, k, n, layers)
    total += gemm("lm_head", hidden, vocab, 1)
    # The adapter's B folded into the product: K grown by the group's total rank, and by that
    # rank padded with zeros to a multiple of 64 and to 128 (the fifth round found K + 32 on
    # gate/up 7% slower where the flops grow 0.8%: the products' K tiles are 64 deep).
    folded = {}
    for name, k, n, parts in products:
        for extra in sorted({parts * r, -(-parts * r // 64) * 64, 128}):
            folded[(name, extra)] = gemm(name, k, n, layers, extra_k=extra) / layers
    # What folding replaces: the branch accumulated into the output (y += h B^T, beta 1) in the
    # forward, and d_y B in the input gradient.
    branch = {}
    for name, k, n, parts in products:
        y = torch.randn(tokens, n, device=dev, dtype=bf)
        h = torch.randn(tokens, parts * r, device=dev, dtype=bf)
        b = torch.randn(n, parts * r, device=dev, dtype=bf)
        acc = timed(lambda: y.addmm_(h, b.t()))
        dh = timed(lambda: y @ b)
        branch[name] = {"accumulate_ms": acc, "dy_b_ms": dh}

    # Which product goes first: the frozen one, then the branch accumulated onto its output
    # (forward y = x W^T; y += h B^T, input gradient dx = dy W; dx += dh A), or the branch's,
    # then the frozen product accumulated onto it (P = h B^T; P += x W^T, and Q = dh A; Q += dy W).
    order = {}
    for name, k, n, parts in products:
        x = torch.randn(tokens, k, device=dev, dtype=bf)
        w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
        dy = torch.randn(tokens, n, device=dev, dtype=bf)
        h = torch.randn(tokens, parts * r, device=dev, dtype=bf)
        b = torch.randn(n, parts * r, device=dev, dtype=bf)
        a = torch.randn(parts * r, k, device=dev, dtype=bf)
        order[name] = {
            "frozen_first_forward_ms": timed(lambda: (x @ w.t()).addmm_(h, b.t())),
            "branch_first_forward_ms": timed(lambda: (h @ b.t()).addmm_(x, w.t())),
            "frozen_first_input_grad_ms": timed(lambda: (dy @ w).addmm_(h, a)),
            "branch_first_input_grad_ms": timed(lambda: (h @ a).addmm_(dy, w)),
        }

    # Contiguous (batch, heads, seq, head_dim), not the trainer's layouts (q and k
    # (batch, seq, heads, head_dim) in memory): FlashAttention is slower here than in the
    # trainer (8B shape, H100: 1.17 ms forward and backward here, 0.655 ms in the trainer's
    # layouts; cuDNN 0.65 either way; bench/gpu.md, seventh round), so the floor takes the
    # fastest backend.
    q = torch.randn(args.batch, heads, args.seq, hd, device=dev, dtype=bf, requires_grad=True)
    k = torch.randn(args.batch, kvh, args.seq, hd, device=dev, dtype=bf, requires_grad=True)
    v = torch.randn(args.batch, kvh, args.seq, hd, device=dev, dtype=bf, requires_grad=True)
    attention = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]:
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                g = torch.randn_like(out)
                fwd = timed(lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True))
                both = timed(lambda: torch.autograd.grad(F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=True), (q, k, v), g))
            attention[backend.name] = {"forward_ms": fwd, "forward_backward_ms": both}
        except RuntimeError as e:
            attention[backend.name] = {"error": str(e).splitlines()[0]}

    print(f"{torch.cuda.get_device_name()}, {args.shape}, batch {args.batch} x seq {args.seq}")
    print("| product | K extra | forward ms (TFLOP/s) | input grad ms (TFLOP/s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['product']} | {row['k_extra']} | {row['forward_ms']:.3f} "
              f"({row['tflops_forward']:.0f}) | {row['input_grad_ms']:.3f} "
              f"({row['tflops_input_grad']:.0f}) |")
    print(f"frozen products of a step (forward + input gradient, {layers} layers + lm_head): "
          f"{total:.1f} ms")
    for (name, extra), cost in folded.items():
        base = next(r_ for r_ in rows if r_["product"] == name and r_["k_extra"] == 0)
        plain = base["forward_ms"] + base["input_grad_ms"]
        print(f"{name}: folded with K + {extra} costs {cost - plain:+.3f} ms a layer; it "
              f"replaces {branch[name]['accumulate_ms']:.3f} (accumulate) + "
              f"{branch[name]['dy_b_ms']:.3f} (d_y B) ms")
    print("| product | frozen first: forward, input grad (ms) | branch first: forward, input grad (ms) |")
    print("|---|---|---|")
    saved = 0.0
    for name, o in order.items():
        print(f"| {name} | {o['frozen_first_forward_ms']:.3f}, {o['frozen_first_input_grad_ms']:.3f} "
              f"| {o['branch_first_forward_ms']:.3f}, {o['branch_first_input_grad_ms']:.3f} |")
        saved += (o["frozen_first_forward_ms"] + o["frozen_first_input_grad_ms"]
                  - o["branch_first_forward_ms"] - o["branch_first_input_grad_ms"])
    print(f"branch first saves {saved:.3f} ms a layer, {saved * layers:.1f} ms a step")
    best = min((a["forward_backward_ms"] for a in attention.values() if "error" not in a),
               default=0.0)
    for name, a in attention.items():
        print(f"attention {name}: {a}")
    print(f"floor (products + fastest attention x {layers}): {total + best * layers:.1f} ms")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape,
                       "rows": rows, "branch": branch, "order": order, "attention": attention,
                       "products_ms": total, "floor_ms": total + best * layers}, f, indent=1)


if __name__ == "__main__":
    main()
