"""Writes a tiny random Llama-family model as GGUF, its weights in every encoding
`loraforge models import` reads, so one import exercises all of its dequantizers.

Usage: gguf_tiny.py OUT_DIR ARCH       (ARCH: llama or qwen2)
Writes OUT_DIR/tiny-ARCH.gguf and OUT_DIR/expected.safetensors: every tensor as gguf-py
dequantizes it (the code transformers uses), by GGUF name, to compare bit for bit.

Encodings gguf-py can quantize are quantized from random weights; for the k-quants it cannot,
the blocks are random bytes with their scales set to small finite values.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
ENCODINGS = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.BF16, T.F32]
# Byte offsets of the f16 scales in each k-quant block, and a value keeping weights near +-0.1.
K_SCALES = {
    T.Q2_K: ([80, 82], 0.002),
    T.Q3_K: ([108], 0.0005),
    T.Q4_K: ([0, 2], 0.0001),
    T.Q5_K: ([0, 2], 0.00005),
    T.Q6_K: ([208], 0.00002),
}
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġ", "c"),
          ("a", "t"), ("Ġc", "at"), ("1", "2"), ("Ġ", "s"), ("Ġs", "at"), ("r", "e"), ("Ġ", "on")]
# Every merged token is what BPE makes of its word, so tokenizers that take a whole word found in
# the vocabulary (llama.cpp's and HF's Llama 3: ignore_merges) and those that do not agree.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def encode(rng: np.random.Generator, values: np.ndarray, kind: T) -> np.ndarray:
    """`values` (rows, cols) in encoding `kind`: quantized, or random k-quant blocks."""
    if kind == T.F32:
        return values.astype(np.float32)
    if kind not in K_SCALES:
        return quantize(values.astype(np.float32), kind)
    block_elements, block_bytes = GGML_QUANT_SIZES[kind]
    rows, cols = values.shape
    blocks = rng.integers(0, 256, size=(rows, cols // block_elements, block_bytes), dtype=np.uint8)
    offsets, scale = K_SCALES[kind]
    for offset in offsets:
        blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def main(out: str, arch: str) -> None:
    rng = np.random.default_rng(7)
    tokens = SPECIALS + byte_alphabet() + [a + b for a, b in MERGES] + ["<think>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS

    path = os.path.join(out, f"tiny-{arch}.gguf")
    writer = GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe" if arch == "llama" else "qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(arch == "llama")
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")

    matrices = [("token_embd.weight", (vocab, HIDDEN))]
    for i in range(LAYERS):
        p = f"blk.{i}"
        matrices += [
            (f"{p}.attn_q.weight", (HEADS * head_dim, HIDDEN)),
            (f"{p}.attn_k.weight", (KV_HEADS * head_dim, HIDDEN)),
            (f"{p}.attn_v.weight", (KV_HEADS * head_dim, HIDDEN)),
            (f"{p}.attn_output.weight", (HIDDEN, HEADS * head_dim)),
            (f"{p}.ffn_gate.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.ffn_up.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.ffn_down.weight", (HIDDEN, INTERMEDIATE)),
        ]
    matrices.append(("output.weight", (vocab, HIDDEN)))
    # The embedding rows (vocab) need not be a multiple of anything; every row is 256 or 512 long.
    expected = {}
    for index, (name, shape) in enumerate(matrices):
        kind = ENCODINGS[index % len(ENCODINGS)]
        values = rng.uniform(-0.1, 0.1, size=shape).astype(np.float32)
        data = encode(rng, values, kind)
        writer.add_tensor(name, data, raw_dtype=kind if kind != T.F32 else None)
        expected[name] = np.ascontiguousarray(dequantize(data, kind).astype(np.float32).reshape(shape))
    vectors = [("output_norm.weight", HIDDEN)]
    for i in range(LAYERS):
        vectors += [(f"blk.{i}.attn_norm.weight", HIDDEN), (f"blk.{i}.ffn_norm.weight", HIDDEN)]
        if arch == "qwen2":
            vectors += [(f"blk.{i}.attn_q.bias", HEADS * head_dim), (f"blk.{i}.attn_k.bias", KV_HEADS * head_dim),
                        (f"blk.{i}.attn_v.bias", KV_HEADS * head_dim)]
    for name, n in vectors:
        centre = 0.0 if name.endswith(".bias") else 1.0
        values = (centre + rng.uniform(-0.2, 0.2, size=n)).astype(np.float32)
        writer.add_tensor(name, values)
        expected[name] = values

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(expected, os.path.join(out, "expected.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
