//! CUDA kernels of our own for the elementwise work libtorch runs as several kernels, compiled
//! at run time with NVRTC and launched on libtorch's stream on the tensors' device memory.
//!
//! SwiGLU is the case that pays: in a training step `silu(gate) * up` and its gradient read and
//! write the `(tokens, intermediate)` tensors, the largest of a layer, once per libtorch kernel,
//! and gate and up are halves of one merged product, strided views that libtorch's vectorised
//! kernels do not take. Measured on an H100 (TinyLlama, batch 8 x seq 2048, bench/gpu.md):
//! forward 0.52 ms a layer in two kernels, backward 1.35 ms in five. Here each direction is one
//! pass over its inputs and outputs. RoPE (ten strided kernels a layer, forward and backward)
//! and RMSNorm's backward (with the residual's gradient added) serve the layer by hand
//! (model/llama/layer_backward.rs). The cross-entropy (model/lm_loss.rs) reads a chunk's
//! logits once for the loss and once more to write its gradient over them, where libtorch's
//! fp32 path (cast, log-sum-exp, gather, subtract, exp, cast back) passes over them about seven
//! times, in fp32: on Llama-3's 128k vocabulary the logits of a step are 0.5 G elements.
//!
//! The kernels compute what libtorch computes, rounding where it rounds: `silu(gate)` in fp32,
//! rounded to bf16, then the product in fp32 and rounded (`silu_backward` likewise), so the
//! results are those of the libtorch path up to the exponential's last bit. They take bf16 on
//! CUDA only; everything else (the CPU, fp32, a build or machine without NVRTC) keeps libtorch's
//! kernels, which is also what `LORAFORGE_CUDA_KERNELS=off` selects (`-rope`, `-rms_norm`,
//! `-swiglu`, `-cross_entropy`, `-lora`: those families alone).
//!
//! One more packs a group of projections' low-rank factors for the layer by hand's products
//! (`pack_lora`: bf16 casts of the `A`s stacked and the scaled `B`s block-diagonal), once per
//! group and pass where libtorch took about a dozen small kernels: on Llama-3-8B some 900 a
//! step, a few microseconds each.
//!
//! Both libraries are opened at run time (`libcuda.so` from the driver, `libnvrtc.so` from the
//! CUDA toolkit or PyTorch's `nvidia-cuda-nvrtc` package, found through `LD_LIBRARY_PATH`), so
//! nothing CUDA is needed to build. The stream is the legacy default stream, which is libtorch's
//! current stream unless a caller sets another (the trainer never does): launches there are
//! ordered with libtorch's kernels before and after them, and the caching allocator's reuse of
//! a freed tensor's memory stays safe.

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::{Arc, OnceLock};
use tch::{Device, Kind, Tensor};

/// bf16 as its bits, converted by hand: NVRTC then needs no header.
const SOURCE: &str = r#"
typedef unsigned short bf16;
typedef unsigned int u32;

__device__ __forceinline__ float load(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even, as c10::BFloat16 does; NaN stays NaN.
__device__ __forceinline__ bf16 store(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16)(u >> 16);
}

__device__ __forceinline__ float round_bf16(float f) { return load(store(f)); }

// Eight bf16 at a time: 16-byte loads and stores.
__device__ __forceinline__ float lane(const uint4& v, int i) {
  u32 w = i < 2 ? v.x : i < 4 ? v.y : i < 6 ? v.z : v.w;
  return load((bf16)((i & 1) ? (w >> 16) : (w & 0xffffu)));
}
__device__ __forceinline__ void set_lane(uint4& v, int i, float f) {
  u32 b = store(f);
  u32* w = i < 2 ? &v.x : i < 4 ? &v.y : i < 6 ? &v.z : &v.w;
  *w = (i & 1) ? ((*w & 0xffffu) | (b << 16)) : ((*w & 0xffff0000u) | b);
}

// gate_up (rows, 2 * inter): gate then up in each row; out (rows, inter) = silu(gate) * up.
// `vecs` = inter / 8 eight-element groups a row, rows * vecs < 2^31.
extern "C" __global__ void swiglu_forward(const uint4* __restrict__ gate_up, uint4* __restrict__ out,
                                          u32 rows, u32 vecs) {
  u32 total = rows * vecs;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    u32 r = i / vecs, c = i - r * vecs;
    uint4 g = gate_up[(size_t)r * 2 * vecs + c], u = gate_up[(size_t)r * 2 * vecs + vecs + c], y;
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
      float x = lane(g, k);
      float act = round_bf16(x / (1.0f + expf(-x)));
      set_lane(y, k, act * lane(u, k));
    }
    out[i] = y;
  }
}

// The gradient of the above for d_out (rows, inter): d_gate_up (rows, 2 * inter) and, where
// `gated` is not null, the forward's output again (the down projection's LoRA A gradient needs
// it). As libtorch: d_gate = silu_backward(round(d_out * up), gate), d_up = d_out * round(silu).
extern "C" __global__ void swiglu_backward(const uint4* __restrict__ gate_up, const uint4* __restrict__ d_out,
                                           uint4* __restrict__ d_gate_up, uint4* __restrict__ gated,
                                           u32 rows, u32 vecs) {
  u32 total = rows * vecs;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    u32 r = i / vecs, c = i - r * vecs;
    size_t gi = (size_t)r * 2 * vecs + c, ui = gi + vecs;
    uint4 g = gate_up[gi], u = gate_up[ui], dy = d_out[i], dg, du, y;
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
      float x = lane(g, k), up = lane(u, k), d = lane(dy, k);
      float sig = 1.0f / (1.0f + expf(-x));
      float act = round_bf16(x / (1.0f + expf(-x)));
      float d_times_up = round_bf16(d * up);
      set_lane(dg, k, d_times_up * sig * (1.0f + x * (1.0f - sig)));
      set_lane(du, k, d * act);
      set_lane(y, k, act * up);
    }
    d_gate_up[gi] = dg;
    d_gate_up[ui] = du;
    if (gated) gated[i] = y;
  }
}

// swiglu_backward with the down projection's LoRA A gradient folded in, so that the forward's
// output is never written again and read back: besides d_gate_up it writes, per tile of
// LORA_ROWS rows (blockIdx.y), partial[tile][r][col] = sum over the tile's rows t of
// dh[t][r] * gated[t][col], gated = round(round(silu(gate)) * up) as swiglu_forward stores it;
// the tiles' sum (libtorch's, in a fixed order) is dh^T gated. A thread takes two columns
// (`pairs` = inter / 2) down a tile's rows; dh (rows, rank <= LORA_MAX_RANK) waits in shared
// memory as fp32.
#define LORA_ROWS 256
#define LORA_MAX_RANK 32
extern "C" __global__ void swiglu_backward_lora(const u32* __restrict__ gate_up, const u32* __restrict__ d_out,
                                                u32* __restrict__ d_gate_up, const bf16* __restrict__ dh,
                                                float* __restrict__ partial, u32 rows, u32 pairs, u32 rank) {
  __shared__ float dh_s[LORA_ROWS * LORA_MAX_RANK];
  u32 first = blockIdx.y * LORA_ROWS;
  u32 n = min((u32)LORA_ROWS, rows - first);
  for (u32 i = threadIdx.x; i < n * rank; i += blockDim.x) {
    u32 t = i / rank, r = i - t * rank;
    dh_s[t * LORA_MAX_RANK + r] = load(dh[(size_t)(first + t) * rank + r]);
  }
  __syncthreads();
  u32 p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  float acc0[LORA_MAX_RANK], acc1[LORA_MAX_RANK];
  #pragma unroll
  for (int r = 0; r < LORA_MAX_RANK; ++r) acc0[r] = acc1[r] = 0.0f;
  for (u32 t = 0; t < n; ++t) {
    size_t row = first + t;
    u32 g = gate_up[row * 2 * pairs + p], u = gate_up[row * 2 * pairs + pairs + p];
    u32 dy = d_out[row * pairs + p];
    u32 dg = 0, du = 0;
    float y[2];
    #pragma unroll
    for (int e = 0; e < 2; ++e) {
      float x = load((bf16)(e ? g >> 16 : g & 0xffffu)), up = load((bf16)(e ? u >> 16 : u & 0xffffu));
      float d = load((bf16)(e ? dy >> 16 : dy & 0xffffu));
      float sig = 1.0f / (1.0f + expf(-x));
      float act = round_bf16(x / (1.0f + expf(-x)));
      float d_times_up = round_bf16(d * up);
      dg |= (u32)store(d_times_up * sig * (1.0f + x * (1.0f - sig))) << (16 * e);
      du |= (u32)store(d * act) << (16 * e);
      y[e] = round_bf16(act * up);
    }
    d_gate_up[row * 2 * pairs + p] = dg;
    d_gate_up[row * 2 * pairs + pairs + p] = du;
    const float* d_row = dh_s + t * LORA_MAX_RANK;
    #pragma unroll
    for (int r = 0; r < LORA_MAX_RANK; ++r) {
      if (r < rank) {
        acc0[r] += d_row[r] * y[0];
        acc1[r] += d_row[r] * y[1];
      }
    }
  }
  float2* out = (float2*)(partial + (size_t)blockIdx.y * rank * 2 * pairs);
  #pragma unroll
  for (int r = 0; r < LORA_MAX_RANK; ++r)
    if (r < rank) out[(size_t)r * pairs + p] = make_float2(acc0[r], acc1[r]);
}

// RMSNorm's input gradient for y = w * (x * rstd): dx = rstd * (dy w - x^ mean(dy w x^)),
// x^ = x * rstd, one block a row, in fp32; plus `residual` (nullable), the gradient that
// reaches x around the norm, so the sum is one rounding and one pass. Eight columns at a time
// (`vecs` = cols / 8): 16-byte loads, where two-byte ones left it at half the memory's speed.
extern "C" __global__ void rms_norm_backward(const uint4* __restrict__ dy, const uint4* __restrict__ x,
                                             const float* __restrict__ rstd, const uint4* __restrict__ w,
                                             const uint4* __restrict__ residual, uint4* __restrict__ dx,
                                             u32 rows, u32 vecs) {
  __shared__ float partial[32];
  for (u32 row = blockIdx.x; row < rows; row += gridDim.x) {
    size_t base = (size_t)row * vecs;
    float r = rstd[row], acc = 0.0f;
    for (u32 c = threadIdx.x; c < vecs; c += blockDim.x) {
      uint4 d = dy[base + c], xv = x[base + c], wv = w[c];
      #pragma unroll
      for (int k = 0; k < 8; ++k) acc += lane(d, k) * lane(wv, k) * lane(xv, k) * r;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    float total = 0.0f;
    for (u32 i = 0; i < (blockDim.x >> 5); ++i) total += partial[i];
    float mean = total / (float)(vecs * 8);
    for (u32 c = threadIdx.x; c < vecs; c += blockDim.x) {
      uint4 d = dy[base + c], xv = x[base + c], wv = w[c], res, out;
      if (residual) res = residual[base + c];
      #pragma unroll
      for (int k = 0; k < 8; ++k) {
        float v = r * (lane(d, k) * lane(wv, k) - lane(xv, k) * r * mean);
        if (residual) v += lane(res, k);
        set_lane(out, k, v);
      }
      dx[base + c] = out;
    }
    __syncthreads();
  }
}

// RoPE (rotate_half) of the q and k heads of qkv (tokens, width), the first `heads` +
// `kv_heads` heads of each row, at position token % seq, into q (tokens, heads, hd) and
// k (tokens, kv_heads, hd). As libtorch's x * cos + rotate_half(x) * sin: each product rounded,
// then the sum. A thread rotates eight pairs (16-byte loads): hd / 2 and width are multiples
// of 8, `groups` = hd / 16 a head.
// Thread i's eight pairs: its token, head and first column j, and the tables' values there
// (c1, s1 at columns j.., c2, s2 at j + hd / 2..).
struct RopeAt { u32 t, head, j; uint4 c1, c2, s1, s2; };
__device__ __forceinline__ RopeAt rope_at(u32 i, u32 per_token, u32 groups, u32 seq, u32 hd,
                                          const bf16* cos_t, const bf16* sin_t) {
  RopeAt at;
  at.t = i / per_token;
  u32 rest = i - at.t * per_token;
  at.head = rest / groups;
  at.j = (rest - at.head * groups) * 8;
  const bf16* c = cos_t + (size_t)(at.t % seq) * hd + at.j;
  const bf16* s = sin_t + (size_t)(at.t % seq) * hd + at.j;
  at.c1 = *(const uint4*)c;
  at.c2 = *(const uint4*)(c + hd / 2);
  at.s1 = *(const uint4*)s;
  at.s2 = *(const uint4*)(s + hd / 2);
  return at;
}

extern "C" __global__ void rope_forward(const bf16* __restrict__ qkv, const bf16* __restrict__ cos_t,
                                        const bf16* __restrict__ sin_t, bf16* __restrict__ q,
                                        bf16* __restrict__ k, u32 tokens, u32 seq, u32 heads,
                                        u32 kv_heads, u32 hd, u32 width) {
  u32 half = hd / 2, groups = half / 8, per_token = (heads + kv_heads) * groups;
  u32 total = tokens * per_token;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    RopeAt at = rope_at(i, per_token, groups, seq, hd, cos_t, sin_t);
    u32 t = at.t, head = at.head;
    const bf16* src = qkv + (size_t)t * width + (size_t)head * hd + at.j;
    uint4 x1 = *(const uint4*)src, x2 = *(const uint4*)(src + half), y1, y2;
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      float a = lane(x1, e), b = lane(x2, e);
      set_lane(y1, e, round_bf16(a * lane(at.c1, e)) + round_bf16(-b * lane(at.s1, e)));
      set_lane(y2, e, round_bf16(b * lane(at.c2, e)) + round_bf16(a * lane(at.s2, e)));
    }
    bf16* dst = head < heads ? q + ((size_t)t * heads + head) * hd : k + ((size_t)t * kv_heads + head - heads) * hd;
    *(uint4*)(dst + at.j) = y1;
    *(uint4*)(dst + at.j + half) = y2;
  }
}

// The gradient of rope_forward for dq (tokens, heads, hd) and dk (tokens, kv_heads, hd), into
// the q and k columns of d_qkv (tokens, width): dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
extern "C" __global__ void rope_backward(const bf16* __restrict__ dq, const bf16* __restrict__ dk,
                                         const bf16* __restrict__ cos_t, const bf16* __restrict__ sin_t,
                                         bf16* __restrict__ d_qkv, u32 tokens, u32 seq, u32 heads,
                                         u32 kv_heads, u32 hd, u32 width) {
  u32 half = hd / 2, groups = half / 8, per_token = (heads + kv_heads) * groups;
  u32 total = tokens * per_token;
  for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    RopeAt at = rope_at(i, per_token, groups, seq, hd, cos_t, sin_t);
    u32 t = at.t, head = at.head;
    const bf16* src = (head < heads ? dq + ((size_t)t * heads + head) * hd : dk + ((size_t)t * kv_heads + head - heads) * hd) + at.j;
    uint4 d1 = *(const uint4*)src, d2 = *(const uint4*)(src + half), y1, y2;
    #pragma unroll
    for (int e = 0; e < 8; ++e) {
      float a = lane(d1, e), b = lane(d2, e);
      set_lane(y1, e, a * lane(at.c1, e) + b * lane(at.s2, e));
      set_lane(y2, e, b * lane(at.c2, e) - a * lane(at.s1, e));
    }
    bf16* dst = d_qkv + (size_t)t * width + (size_t)head * hd + at.j;
    *(uint4*)dst = y1;
    *(uint4*)(dst + half) = y2;
  }
}

// Cross-entropy of each row of `logits (rows, vocab)` against its label `targets[row]` (int64):
// the row's log-sum-exp into `lse` and its loss `lse - logit[target]` into `loss`, in fp32. One
// block a row, which it reads once (a running maximum and sum, merged across threads);
// `vecs` = vocab / 8.
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  float top = fmaxf(m, m2);
  if (top == __int_as_float(0xff800000)) return;  // both empty
  s = s * expf(m - top) + s2 * expf(m2 - top);
  m = top;
}

extern "C" __global__ void cross_entropy_forward(const uint4* __restrict__ logits,
                                                 const long long* __restrict__ targets,
                                                 float* __restrict__ lse, float* __restrict__ loss,
                                                 u32 rows, u32 vecs) {
  __shared__ float part_m[32], part_s[32];
  const float empty = __int_as_float(0xff800000);
  for (u32 row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint4* x = logits + (size_t)row * vecs;
    float m = empty, s = 0.0f;
    for (u32 c = threadIdx.x; c < vecs; c += blockDim.x) {
      uint4 v = x[c];
      float top = m;
      #pragma unroll
      for (int k = 0; k < 8; ++k) top = fmaxf(top, lane(v, k));
      float sum = m == empty ? 0.0f : s * expf(m - top);
      #pragma unroll
      for (int k = 0; k < 8; ++k) sum += expf(lane(v, k) - top);
      m = top;
      s = sum;
    }
    for (int o = 16; o > 0; o >>= 1)
      merge_lse(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
    if ((threadIdx.x & 31) == 0) { part_m[threadIdx.x >> 5] = m; part_s[threadIdx.x >> 5] = s; }
    __syncthreads();
    if (threadIdx.x == 0) {
      float tm = part_m[0], ts = part_s[0];
      for (u32 i = 1; i < (blockDim.x >> 5); ++i) merge_lse(tm, ts, part_m[i], part_s[i]);
      float l = tm + logf(ts);
      long long t = targets[row];
      const bf16* xs = (const bf16*)x;
      lse[row] = l;
      loss[row] = l - load(xs[t]);
    }
    __syncthreads();
  }
}

// The loss's gradient with respect to the logits, written over them in bf16: softmax - onehot,
// exp(x - lse) in fp32 with 1 taken off at the label, then rounded (as libtorch computes it in
// fp32 and casts). `vecs` = vocab / 8, rows * vecs eight-element groups.
extern "C" __global__ void cross_entropy_backward(uint4* __restrict__ logits,
                                                  const long long* __restrict__ targets,
                                                  const float* __restrict__ lse, u32 rows, u32 vecs) {
  size_t total = (size_t)rows * vecs;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    u32 r = (u32)(i / vecs);
    long long first = (long long)(i - (size_t)r * vecs) * 8, t = targets[r];
    float l = lse[r];
    uint4 v = logits[i], d;
    #pragma unroll
    for (int k = 0; k < 8; ++k) {
      float p = expf(lane(v, k) - l);
      if (first + k == t) p -= 1.0f;
      set_lane(d, k, p);
    }
    logits[i] = d;
  }
}

// A projection group's low-rank branches packed for its products, in bf16 (model/llama.rs,
// `Merged::product_of`): `a_out (total_r, in)` the parts' `A`s stacked, and `b_out (rows,
// total_r)` block-diagonal, part p's block `scale_p B_p` at rows `row_off_p..` and the columns
// after the parts before it, zeros elsewhere. Up to three parts; `A_p (r_p, in)` and `B_p
// (rows_p, r_p)` contiguous fp32. Each rounded once, as a cast (and for `B` the fp32 product
// with its scale, then a cast) rounds.
struct PackPart { const float* a; const float* b; u32 r, row_off, rows; float scale; };
struct PackParts { PackPart p[3]; u32 count; };
extern "C" __global__ void pack_lora(PackParts parts, bf16* __restrict__ a_out, bf16* __restrict__ b_out,
                                     u32 in, u32 total_rows, u32 total_r) {
  size_t a_items = (size_t)total_r * in, total = a_items + (size_t)total_rows * total_r;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
    if (i < a_items) {
      u32 row = (u32)(i / in), col = (u32)(i - (size_t)row * in), off = 0, p = 0;
      while (p + 1 < parts.count && row >= off + parts.p[p].r) off += parts.p[p++].r;
      a_out[i] = store(parts.p[p].a[(size_t)(row - off) * in + col]);
    } else {
      size_t j = i - a_items;
      u32 row = (u32)(j / total_r), col = (u32)(j - (size_t)row * total_r), off = 0;
      float v = 0.0f;
      for (u32 p = 0; p < parts.count; ++p) {
        const PackPart& q = parts.p[p];
        if (col >= off && col < off + q.r && row >= q.row_off && row < q.row_off + q.rows)
          v = q.scale * q.b[(size_t)(row - q.row_off) * q.r + (col - off)];
        off += q.r;
      }
      b_out[j] = store(v);
    }
  }
}

// The residual stream after a sublayer and its RMSNorm in one pass, for the layer by hand's
// forward: sum = x + y rounded to bf16 (libtorch's add), rstd = 1 / sqrt(mean(sum^2) + eps) in
// fp32 (into rstd_out, a float a row), out = sum * rstd * w rounded once. One block a row,
// eight columns at a time (`vecs` = cols / 8): each thread reads back the sums it wrote.
extern "C" __global__ void add_rms_norm(const uint4* __restrict__ x, const uint4* __restrict__ y,
                                        const uint4* __restrict__ w, uint4* __restrict__ sum,
                                        uint4* __restrict__ out, float* __restrict__ rstd_out,
                                        u32 rows, u32 vecs, float eps) {
  __shared__ float partial[32];
  for (u32 row = blockIdx.x; row < rows; row += gridDim.x) {
    size_t base = (size_t)row * vecs;
    float acc = 0.0f;
    for (u32 c = threadIdx.x; c < vecs; c += blockDim.x) {
      uint4 a = x[base + c], b = y[base + c], s;
      #pragma unroll
      for (int k = 0; k < 8; ++k) {
        float v = round_bf16(lane(a, k) + lane(b, k));
        set_lane(s, k, v);
        acc += v * v;
      }
      sum[base + c] = s;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = acc;
    __syncthreads();
    float total = 0.0f;
    for (u32 i = 0; i < (blockDim.x >> 5); ++i) total += partial[i];
    float r = 1.0f / sqrtf(total / (float)(vecs * 8) + eps);
    if (threadIdx.x == 0) rstd_out[row] = r;
    for (u32 c = threadIdx.x; c < vecs; c += blockDim.x) {
      uint4 s = sum[base + c], wv = w[c], o;
      #pragma unroll
      for (int k = 0; k < 8; ++k) set_lane(o, k, lane(s, k) * r * lane(wv, k));
      out[base + c] = o;
    }
    __syncthreads();
  }
}

// One AdamW step over a flat fp32 group (training/optimizer.rs): `torch.optim.AdamW`'s
// single-tensor arithmetic, the dozen libtorch kernels it takes as one pass, each operation
// rounded as its own kernel rounds it (the `_rn` intrinsics: no fused multiply-adds):
// p *= decay; m = lerp(m, g, 1 - beta1); v = v * beta2 + (g * (1 - beta2)) * g;
// p += (m * -step_size) / (sqrt(v) / bc2_sqrt + eps). The constants come rounded to fp32, as
// libtorch rounds a double scalar for an fp32 tensor.
extern "C" __global__ void adamw_step(float* __restrict__ p, const float* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v, size_t n,
                                      float decay, float lerp_weight, float beta2, float one_minus_beta2,
                                      float neg_step_size, float bc2_sqrt, float eps) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    float gi = g[i], mi = m[i], vi = v[i];
    float pi = __fmul_rn(p[i], decay);
    // libtorch's lerp for a weight below one half: self + weight * (end - self).
    mi = __fadd_rn(mi, __fmul_rn(lerp_weight, __fsub_rn(gi, mi)));
    vi = __fadd_rn(__fmul_rn(vi, beta2), __fmul_rn(__fmul_rn(gi, one_minus_beta2), gi));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
    p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(mi, neg_step_size), denom));
    m[i] = mi;
    v[i] = vi;
  }
}
"#;

const THREADS: u32 = 256;

/// The compiled kernels, on the device they were compiled for.
struct Kernels {
    ordinal: usize,
    stream: Arc<CudaStream>,
    swiglu_forward: CudaFunction,
    swiglu_backward: CudaFunction,
    swiglu_backward_lora: CudaFunction,
    rms_norm_backward: CudaFunction,
    rope_forward: CudaFunction,
    rope_backward: CudaFunction,
    cross_entropy_forward: CudaFunction,
    cross_entropy_backward: CudaFunction,
    pack_lora: CudaFunction,
    add_rms_norm: CudaFunction,
    adamw_step: CudaFunction,
    /// Blocks enough to fill the device; the kernels loop over the rest.
    max_blocks: u32,
}

static KERNELS: OnceLock<Option<Kernels>> = OnceLock::new();

/// A family of kernels: SwiGLU, RoPE, RMSNorm's (and its backward), the cross-entropy, the
/// packing of the low-rank factors, or AdamW's step.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Swiglu,
    Rope,
    RmsNorm,
    CrossEntropy,
    Lora,
    Adamw,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Swiglu,
        Family::Rope,
        Family::RmsNorm,
        Family::CrossEntropy,
        Family::Lora,
        Family::Adamw,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Swiglu => "swiglu",
            Family::Rope => "rope",
            Family::RmsNorm => "rms_norm",
            Family::CrossEntropy => "cross_entropy",
            Family::Lora => "lora",
            Family::Adamw => "adamw",
        }
    }
}

/// Whether `family` runs, from `LORAFORGE_CUDA_KERNELS`: `off` (or `0`) switches every kernel
/// off, a list such as `-rope,-rms_norm` the families it names (to tell which kernel a
/// difference on the GPU comes from, bench/gpu.md); unset, all run.
fn switched_on(family: Family) -> bool {
    static OFF: OnceLock<Vec<Family>> = OnceLock::new();
    let off = OFF.get_or_init(|| {
        let value = std::env::var("LORAFORGE_CUDA_KERNELS").unwrap_or_default();
        let off: Vec<Family> = Family::ALL
            .into_iter()
            .filter(|f| {
                value
                    .split(',')
                    .any(|w| w.trim() == format!("-{}", f.name()))
            })
            .collect();
        if !off.is_empty() {
            let names: Vec<&str> = off.iter().map(|f| f.name()).collect();
            tracing::info!(
                "LORAFORGE_CUDA_KERNELS: libtorch's operations for {}",
                names.join(", ")
            );
        }
        off
    });
    !off.contains(&family)
}

/// The kernels for `device`, compiled on first use; `None` where they cannot run there (not
/// CUDA, switched off, no driver or NVRTC library, a compile error), each reason logged once.
fn kernels(device: Device, family: Family) -> Option<&'static Kernels> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    if !switched_on(family) {
        return None;
    }
    let kernels = KERNELS.get_or_init(|| {
        if std::env::var("LORAFORGE_CUDA_KERNELS").is_ok_and(|v| v == "off" || v == "0") {
            tracing::info!("LORAFORGE_CUDA_KERNELS=off: libtorch's kernels only");
            return None;
        }
        // cudarc panics where it cannot open a library: that is "not available", not a failure.
        match std::panic::catch_unwind(|| compile(ordinal)) {
            Ok(Ok(kernels)) => {
                tracing::info!(
                    "fused CUDA kernels compiled with NVRTC (SwiGLU, RoPE, RMSNorm, \
                     cross-entropy, LoRA factors' packing, AdamW)"
                );
                Some(kernels)
            }
            Ok(Err(e)) => {
                tracing::warn!("fused CUDA kernels unavailable ({e}): libtorch's kernels instead");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "fused CUDA kernels unavailable (the CUDA driver or NVRTC library could not be \
                     opened): libtorch's kernels instead"
                );
                None
            }
        }
    });
    kernels.as_ref().filter(|k| k.ordinal == ordinal)
}

fn compile(ordinal: usize) -> Result<Kernels, String> {
    let ctx = CudaContext::new(ordinal).map_err(|e| format!("CUDA context: {e}"))?;
    let ptx = cudarc::nvrtc::compile_ptx(SOURCE).map_err(|e| format!("NVRTC: {e}"))?;
    let module = ctx
        .load_module(ptx)
        .map_err(|e| format!("loading the kernels: {e}"))?;
    let function = |name: &str| {
        module
            .load_function(name)
            .map_err(|e| format!("kernel {name}: {e}"))
    };
    let sms = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| format!("device attributes: {e}"))?;
    Ok(Kernels {
        ordinal,
        stream: ctx.default_stream(),
        swiglu_forward: function("swiglu_forward")?,
        swiglu_backward: function("swiglu_backward")?,
        swiglu_backward_lora: function("swiglu_backward_lora")?,
        rms_norm_backward: function("rms_norm_backward")?,
        rope_forward: function("rope_forward")?,
        rope_backward: function("rope_backward")?,
        cross_entropy_forward: function("cross_entropy_forward")?,
        cross_entropy_backward: function("cross_entropy_backward")?,
        pack_lora: function("pack_lora")?,
        add_rms_norm: function("add_rms_norm")?,
        adamw_step: function("adamw_step")?,
        max_blocks: sms.max(1) as u32 * 16,
    })
}

/// The shape the SwiGLU kernels take: `gate_up (rows, 2 * inter)` contiguous bf16 on CUDA with
/// `inter` a multiple of 8; `(rows, inter / 8)` then, else `None`.
fn swiglu_shape(gate_up: &Tensor) -> Option<(u32, u32)> {
    let size = gate_up.size();
    let fits = gate_up.kind() == Kind::BFloat16
        && size.len() == 2
        && gate_up.is_contiguous()
        && aligned(&[gate_up])
        && size[1] % 16 == 0;
    let (rows, vecs) = (size.first()?, size.get(1)? / 16);
    let total = rows.checked_mul(vecs)?;
    (fits && total > 0 && total < i32::MAX as i64).then_some((*rows as u32, vecs as u32))
}

fn pointer(t: &Tensor) -> u64 {
    t.data_ptr() as u64
}

/// `silu(gate) * up` for `gate_up (rows, 2 * inter)`, gate and up side by side; `None` where
/// the kernel does not apply (the caller computes it with libtorch).
pub fn swiglu(gate_up: &Tensor) -> Option<Tensor> {
    let (rows, vecs) = swiglu_shape(gate_up)?;
    let k = kernels(gate_up.device(), Family::Swiglu)?;
    let out = Tensor::empty(
        [rows as i64, vecs as i64 * 8],
        (Kind::BFloat16, gate_up.device()),
    );
    let (input, output) = (pointer(gate_up), pointer(&out));
    let mut launch = k.stream.launch_builder(&k.swiglu_forward);
    launch.arg(&input).arg(&output).arg(&rows).arg(&vecs);
    // SAFETY: the pointers are the tensors' device memory, of the sizes the kernel indexes
    // (checked by `swiglu_shape`), alive until after the launch is ordered on their stream.
    unsafe { launch.launch(grid(k, (rows * vecs) as usize)) }.expect("launching swiglu_forward");
    Some(out)
}

/// What the SwiGLU gradient kernels take: [`swiglu_shape`]'s `(rows, inter / 8)` and `d_out`
/// as a contiguous bf16 `(rows, inter)` on a 16-byte boundary; `None` where they do not apply.
fn swiglu_grad_operands(gate_up: &Tensor, d_out: &Tensor) -> Option<(u32, u32, Tensor)> {
    let (rows, vecs) = swiglu_shape(gate_up)?;
    let d_out = d_out.contiguous();
    let fits = d_out.kind() == Kind::BFloat16
        && d_out.size() == [rows as i64, vecs as i64 * 8]
        && aligned(&[&d_out]);
    fits.then_some((rows, vecs, d_out))
}

/// The gradient of [`swiglu`] for `d_out (rows, inter)`: `d_gate_up (rows, 2 * inter)`, and
/// with `want_gated` the forward's output again; `None` where the kernel does not apply.
pub fn swiglu_backward(
    gate_up: &Tensor,
    d_out: &Tensor,
    want_gated: bool,
) -> Option<(Tensor, Option<Tensor>)> {
    let (rows, vecs, d_out) = swiglu_grad_operands(gate_up, d_out)?;
    let k = kernels(gate_up.device(), Family::Swiglu)?;
    let d_gate_up = gate_up.empty_like();
    let gated = want_gated.then(|| d_out.empty_like());
    let pointers = [gate_up, &d_out, &d_gate_up].map(pointer);
    let gated_pointer = gated.as_ref().map_or(0, pointer);
    let mut launch = k.stream.launch_builder(&k.swiglu_backward);
    launch
        .arg(&pointers[0])
        .arg(&pointers[1])
        .arg(&pointers[2])
        .arg(&gated_pointer)
        .arg(&rows)
        .arg(&vecs);
    // SAFETY: as in `swiglu`; `gated` is null or a tensor of `d_out`'s size.
    unsafe { launch.launch(grid(k, (rows * vecs) as usize)) }.expect("launching swiglu_backward");
    Some((d_gate_up, gated))
}

/// The rows of a tile and the largest rank of [`swiglu_backward_with_a_grad`] (the kernel's
/// `LORA_ROWS`, `LORA_MAX_RANK`).
const LORA_ROWS: i64 = 256;
const LORA_MAX_RANK: i64 = 32;

/// [`swiglu_backward`] and, for `dh (rows, rank)` (the down projection's `scaling d_y B`), its
/// LoRA `A` gradient `dh^T gated (rank, inter)` in fp32, without writing `gated`: one kernel
/// over the tiles of rows, then the tiles' partial products summed. `None` where the kernel
/// does not apply (a rank above 32, among others).
pub fn swiglu_backward_with_a_grad(
    gate_up: &Tensor,
    d_out: &Tensor,
    dh: &Tensor,
) -> Option<(Tensor, Tensor)> {
    let (rows, vecs, d_out) = swiglu_grad_operands(gate_up, d_out)?;
    let dh = dh.contiguous();
    let rank = *dh.size().get(1)?;
    let fits = all_bf16_cuda(&[&dh])
        && dh.size() == [rows as i64, rank]
        && (1..=LORA_MAX_RANK).contains(&rank);
    if !fits {
        return None;
    }
    let k = kernels(gate_up.device(), Family::Swiglu)?;
    let tiles = (rows as i64 + LORA_ROWS - 1) / LORA_ROWS;
    let d_gate_up = gate_up.empty_like();
    let inter = vecs as i64 * 8;
    let partial = Tensor::empty([tiles, rank, inter], (Kind::Float, gate_up.device()));
    let pointers = [gate_up, &d_out, &d_gate_up, &dh, &partial].map(pointer);
    let (pairs, rank) = (vecs * 4, rank as u32);
    let mut launch = k.stream.launch_builder(&k.swiglu_backward_lora);
    for p in &pointers {
        launch.arg(p);
    }
    launch.arg(&rows).arg(&pairs).arg(&rank);
    let config = LaunchConfig {
        grid_dim: (pairs.div_ceil(THREADS), tiles as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every pointer is a contiguous tensor of the size the kernel indexes (checked
    // above and by `swiglu_grad_operands`: `inter` a multiple of 8), alive until the launch is
    // ordered on their stream; the kernel's shared memory is static.
    unsafe { launch.launch(config) }.expect("launching swiglu_backward_lora");
    let a_grad = partial.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
    Some((d_gate_up, a_grad))
}

/// One thread per item, in as many blocks as fill the device; the kernels loop over the rest.
fn grid(k: &Kernels, items: usize) -> LaunchConfig {
    let blocks = items
        .div_ceil(THREADS as usize)
        .clamp(1, k.max_blocks as usize) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// What the row kernels (RMSNorm's) take: `x (rows, cols)` 2-D with `cols` a multiple of 8,
/// and `tensors` (x among them) contiguous bf16 on CUDA on 16-byte boundaries; `(rows, cols /
/// 8)` then, else `None`.
fn row_shape(x: &Tensor, tensors: &[&Tensor]) -> Option<(u32, u32)> {
    let size = x.size();
    let (rows, cols) = (*size.first()?, *size.get(1)?);
    let fits = all_bf16_cuda(tensors)
        && size.len() == 2
        && cols % 8 == 0
        && aligned(tensors)
        && rows < i32::MAX as i64;
    fits.then_some((rows as u32, (cols / 8) as u32))
}

/// One block a row, as many rows at once as fill the device (the row kernels loop over the
/// rest).
fn row_blocks(k: &Kernels, rows: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, k.max_blocks), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether every tensor is contiguous bf16 on CUDA: what the kernels below take.
fn all_bf16_cuda(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.kind() == Kind::BFloat16 && t.device().is_cuda() && t.is_contiguous())
}

/// Whether every tensor starts on a 16-byte boundary, for the kernels' 16-byte loads (a view
/// into a tensor can start anywhere).
fn aligned(tensors: &[&Tensor]) -> bool {
    tensors.iter().all(|t| pointer(t).is_multiple_of(16))
}

/// RMSNorm's input gradient for `dy (rows, cols)`, its input `x`, the per-row `rstd (rows, 1)`
/// (fp32, as aten's fused norm returns it) and the weight `w (cols)`, plus `residual` where
/// given; `None` where the kernel does not apply.
pub fn rms_norm_backward(
    dy: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
    residual: Option<&Tensor>,
) -> Option<Tensor> {
    let dy = dy.contiguous();
    let mut tensors = vec![&dy, x, w];
    tensors.extend(residual);
    let (rows, vecs) = row_shape(x, &tensors)?;
    let size = x.size();
    let fits = dy.size() == size
        && residual.is_none_or(|r| r.size() == size)
        && rstd.kind() == Kind::Float
        && rstd.is_contiguous()
        && rstd.numel() == rows as usize;
    if !fits {
        return None;
    }
    let k = kernels(x.device(), Family::RmsNorm)?;
    let dx = x.empty_like();
    let args = [&dy, x, rstd, w].map(pointer);
    let residual = residual.map_or(0, pointer);
    let out = pointer(&dx);
    let mut launch = k.stream.launch_builder(&k.rms_norm_backward);
    launch
        .arg(&args[0])
        .arg(&args[1])
        .arg(&args[2])
        .arg(&args[3]);
    launch.arg(&residual).arg(&out).arg(&rows).arg(&vecs);
    let config = row_blocks(k, rows);
    // SAFETY: every pointer is a contiguous tensor of the size the kernel indexes (checked
    // above), alive until the launch is ordered on their stream.
    unsafe { launch.launch(config) }.expect("launching rms_norm_backward");
    Some(dx)
}

/// `x + y` (the residual stream after a sublayer) and its RMSNorm with weight `w (cols)`, for
/// `x` and `y (rows, cols)`: `(sum, normed, rstd (rows, 1) in fp32)`, what libtorch's add and
/// aten's fused RMSNorm give (the norm up to its last bit), in one pass where they took two
/// and a third tensor's read and write. `None` where the kernel does not apply.
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Option<(Tensor, Tensor, Tensor)> {
    let (rows, vecs) = row_shape(x, &[x, y, w])?;
    if y.size() != x.size() || w.size() != [vecs as i64 * 8] {
        return None;
    }
    let k = kernels(x.device(), Family::RmsNorm)?;
    let (sum, normed) = (x.empty_like(), x.empty_like());
    let rstd = Tensor::empty([rows as i64, 1], (Kind::Float, x.device()));
    let args = [x, y, w, &sum, &normed, &rstd].map(pointer);
    let eps = eps as f32;
    let mut launch = k.stream.launch_builder(&k.add_rms_norm);
    for arg in &args {
        launch.arg(arg);
    }
    launch.arg(&rows).arg(&vecs).arg(&eps);
    let config = row_blocks(k, rows);
    // SAFETY: every pointer is a contiguous tensor of the size the kernel indexes (checked
    // above; the outputs made here), alive until the launch is ordered on their stream.
    unsafe { launch.launch(config) }.expect("launching add_rms_norm");
    Some((sum, normed, rstd))
}

/// The constants of one AdamW step ([`adamw_step`]), as `training::optimizer` computes them in
/// f64.
pub struct AdamwConstants {
    /// `1 - lr * weight_decay`.
    pub decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub step_size: f64,
    pub bias_correction2_sqrt: f64,
    pub eps: f64,
}

/// One AdamW step over a flat group in one kernel: `param`, its gradient and the two moments,
/// contiguous fp32 on one CUDA device, of one length; updated in place. `false` where the
/// kernel does not apply (nothing is written).
pub fn adamw_step(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    c: &AdamwConstants,
) -> bool {
    let tensors = [param, grad, exp_avg, exp_avg_sq];
    let device = param.device();
    let fits = tensors.iter().all(|t| {
        t.kind() == Kind::Float
            && t.device() == device
            && t.is_contiguous()
            && t.numel() == param.numel()
    });
    let Some(k) = fits.then(|| kernels(device, Family::Adamw)).flatten() else {
        return false;
    };
    let n = param.numel();
    let pointers = tensors.map(pointer);
    let scalars = [
        c.decay,
        1.0 - c.beta1,
        c.beta2,
        1.0 - c.beta2,
        -c.step_size,
        c.bias_correction2_sqrt,
        c.eps,
    ]
    .map(|x| x as f32);
    let mut launch = k.stream.launch_builder(&k.adamw_step);
    for p in &pointers {
        launch.arg(p);
    }
    launch.arg(&n);
    for x in &scalars {
        launch.arg(x);
    }
    // SAFETY: four contiguous fp32 tensors of `n` elements on the kernel's device (checked
    // above), alive until the launch is ordered on their stream.
    unsafe { launch.launch(grid(k, n)) }.expect("launching adamw_step");
    true
}

/// The cross-entropy of each row of `logits (rows, vocab)` (contiguous bf16 on CUDA, `vocab` a
/// multiple of 8) against `targets (rows)` (int64, each in `0..vocab`): each row's loss, fp32
/// `(rows)`. With `grad_in_place` the logits are then overwritten with the loss's gradient
/// with respect to them, `softmax - onehot` in bf16. `None` where the kernels do not apply
/// (nothing is written).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, grad_in_place: bool) -> Option<Tensor> {
    let size = logits.size();
    let (rows, vocab) = (*size.first()?, *size.get(1)?);
    let fits = all_bf16_cuda(&[logits])
        && size.len() == 2
        && vocab % 8 == 0
        && targets.kind() == Kind::Int64
        && targets.is_contiguous()
        && targets.size() == [rows]
        && targets.device() == logits.device()
        && rows > 0
        && rows < i32::MAX as i64
        && rows
            .checked_mul(vocab / 8)
            .is_some_and(|n| n < u32::MAX as i64);
    if !fits {
        return None;
    }
    let k = kernels(logits.device(), Family::CrossEntropy)?;
    let options = (Kind::Float, logits.device());
    let (lse, loss) = (
        Tensor::empty([rows], options),
        Tensor::empty([rows], options),
    );
    let pointers = [logits, targets, &lse, &loss].map(pointer);
    let (rows, vecs) = (rows as u32, (vocab / 8) as u32);
    let mut launch = k.stream.launch_builder(&k.cross_entropy_forward);
    for p in &pointers {
        launch.arg(p);
    }
    launch.arg(&rows).arg(&vecs);
    let config = LaunchConfig {
        grid_dim: (rows.clamp(1, k.max_blocks), 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every pointer is a contiguous tensor of the size the kernel indexes (checked
    // above; the labels are the caller's, within the vocabulary), alive until the launch is
    // ordered on their stream.
    unsafe { launch.launch(config) }.expect("launching cross_entropy_forward");
    if grad_in_place {
        let mut launch = k.stream.launch_builder(&k.cross_entropy_backward);
        launch
            .arg(&pointers[0])
            .arg(&pointers[1])
            .arg(&pointers[2])
            .arg(&rows)
            .arg(&vecs);
        // SAFETY: as above.
        unsafe { launch.launch(grid(k, rows as usize * vecs as usize)) }
            .expect("launching cross_entropy_backward");
    }
    Some(loss)
}

/// The shape of attention's heads: `(heads, kv_heads, head_dim)`.
pub type Heads = (i64, i64, i64);

/// RoPE of the q and k heads of `qkv (tokens, width)` (q's heads, then k's, then the rest) at
/// position `token % seq`, with tables `cos`, `sin (seq, head_dim)`: `q (tokens, heads,
/// head_dim)` and `k (tokens, kv_heads, head_dim)`; `None` where the kernel does not apply.
pub fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, heads: Heads) -> Option<(Tensor, Tensor)> {
    let (h, kvh, hd) = heads;
    let (tokens, width) = (*qkv.size().first()?, *qkv.size().get(1)?);
    let seq = *cos.size().first()?;
    let fits = all_bf16_cuda(&[qkv, cos, sin])
        && aligned(&[qkv, cos, sin])
        && (h + kvh) * hd <= width
        && rope_fits(tokens, width, heads)
        && cos.size() == [seq, hd]
        && sin.size() == [seq, hd]
        && seq > 0
        && tokens % seq == 0;
    if !fits {
        return None;
    }
    let k = kernels(qkv.device(), Family::Rope)?;
    let options = (Kind::BFloat16, qkv.device());
    let (q_out, k_out) = (
        Tensor::empty([tokens, h, hd], options),
        Tensor::empty([tokens, kvh, hd], options),
    );
    let tensors = [qkv, cos, sin, &q_out, &k_out];
    launch_rope(
        k,
        &k.rope_forward,
        tensors,
        [tokens, seq, h, kvh, hd, width],
    );
    Some((q_out, k_out))
}

/// The gradient of [`rope`] for `dq (tokens, heads, head_dim)` and `dk (tokens, kv_heads,
/// head_dim)`, written into the q and k columns of `d_qkv (tokens, width)`; `false` where the
/// kernel does not apply (nothing is written).
pub fn rope_backward(
    dq: &Tensor,
    dk: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    d_qkv: &Tensor,
    heads: Heads,
) -> bool {
    let (h, kvh, hd) = heads;
    let size = d_qkv.size();
    let (Some(&tokens), Some(&width), Some(&seq)) = (size.first(), size.get(1), cos.size().first())
    else {
        return false;
    };
    let fits = all_bf16_cuda(&[dq, dk, cos, sin, d_qkv])
        && aligned(&[dq, dk, cos, sin, d_qkv])
        && rope_fits(tokens, width, heads)
        && dq.size() == [tokens, h, hd]
        && dk.size() == [tokens, kvh, hd]
        && cos.size() == [seq, hd]
        && sin.size() == [seq, hd]
        && (h + kvh) * hd <= width
        && seq > 0
        && tokens % seq == 0;
    let Some(k) = kernels(d_qkv.device(), Family::Rope).filter(|_| fits) else {
        return false;
    };
    let tensors = [dq, dk, cos, sin, d_qkv];
    launch_rope(
        k,
        &k.rope_backward,
        tensors,
        [tokens, seq, h, kvh, hd, width],
    );
    true
}

/// Whether the RoPE kernels take these sizes: eight pairs a thread (`head_dim / 2` and the
/// row's width multiples of 8, so every load is 16 bytes on a 16-byte boundary where the
/// One projection's low-rank branch in a group packed by [`pack_lora`]: its factors `a (r, in)`
/// and `b (rows, r)` (fp32), its scaling, and its first row in the group's output.
pub struct LoraPart<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f64,
    pub row: i64,
}

/// The kernel's view of a [`LoraPart`] (`PackPart` in the source).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PackPart {
    a: u64,
    b: u64,
    r: u32,
    row_off: u32,
    rows: u32,
    scale: f32,
}

/// Up to three parts (q, k, v), as the kernel takes them (`PackParts`).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PackParts {
    parts: [PackPart; 3],
    count: u32,
}

// SAFETY: plain `#[repr(C)]` data laid out as the kernel's structs (u64 pointers, u32 and f32).
unsafe impl cudarc::driver::DeviceRepr for PackParts {}

/// A projection group's branches packed for its products in bf16, in one kernel: `a (total r,
/// in)` the parts' `A`s stacked, and `b (rows, total r)` block-diagonal, each part's
/// `scaling B` in its rows and its own columns, zeros elsewhere. The values a cast of `A`, and
/// of `B` times its scaling in fp32, give (what libtorch's casts, concatenation, zeroed buffer
/// and block copies give, in about a dozen kernels). Outside autograd: nothing is recorded.
/// `None` where it does not apply (not fp32 on CUDA, more than three parts).
pub fn pack_lora(parts: &[LoraPart], rows: i64) -> Option<(Tensor, Tensor)> {
    let first = parts.first()?;
    let device = first.a.device();
    let inputs = first.a.size().get(1).copied()?;
    let fits = parts.len() <= 3
        && rows < i32::MAX as i64
        && parts.iter().all(|p| {
            let (a, b) = (p.a.size(), p.b.size());
            [p.a, p.b]
                .iter()
                .all(|t| t.kind() == Kind::Float && t.device() == device)
                && a.len() == 2
                && b.len() == 2
                && a[1] == inputs
                && b[1] == a[0]
                && p.row >= 0
                && p.row + b[0] <= rows
        });
    if !fits {
        return None;
    }
    let k = kernels(device, Family::Lora)?;
    let total_r: i64 = parts.iter().map(|p| p.a.size()[0]).sum();
    let items = (total_r * inputs + rows * total_r) as usize;
    // The factors as contiguous tensors, alive until the launch is ordered (derived factors
    // may be views).
    let held: Vec<(Tensor, Tensor)> = parts
        .iter()
        .map(|p| (p.a.contiguous(), p.b.contiguous()))
        .collect();
    let mut packed = PackParts::default();
    for (slot, (p, (a, b))) in packed.parts.iter_mut().zip(parts.iter().zip(&held)) {
        *slot = PackPart {
            a: pointer(a),
            b: pointer(b),
            r: a.size()[0] as u32,
            row_off: p.row as u32,
            rows: b.size()[0] as u32,
            scale: p.scaling as f32,
        };
    }
    packed.count = parts.len() as u32;
    let a_out = Tensor::empty([total_r, inputs], (Kind::BFloat16, device));
    let b_out = Tensor::empty([rows, total_r], (Kind::BFloat16, device));
    let (a_ptr, b_ptr) = (pointer(&a_out), pointer(&b_out));
    let dims = [inputs, rows, total_r].map(|d| d as u32);
    let mut launch = k.stream.launch_builder(&k.pack_lora);
    launch.arg(&packed).arg(&a_ptr).arg(&b_ptr);
    for dim in &dims {
        launch.arg(dim);
    }
    // SAFETY: every factor is a contiguous fp32 tensor of the size the kernel indexes (checked
    // above), the outputs of `total_r x in` and `rows x total_r`, all alive until the launch is
    // ordered on their stream.
    unsafe { launch.launch(grid(k, items)) }.expect("launching pack_lora");
    Some((a_out, b_out))
}

/// tensors start on one), and a thread count that fits 32 bits.
fn rope_fits(tokens: i64, width: i64, (h, kvh, hd): Heads) -> bool {
    hd % 16 == 0 && width % 8 == 0 && tokens * (h + kvh) * (hd / 16) < i32::MAX as i64
}

/// Launches a RoPE kernel on its five tensors and six sizes `(tokens, seq, heads, kv_heads,
/// head_dim, width)`: one thread per eight pairs of rotated elements.
fn launch_rope(k: &Kernels, function: &CudaFunction, tensors: [&Tensor; 5], sizes: [i64; 6]) {
    let args = tensors.map(pointer);
    debug_assert!(
        args.iter().all(|p| p.is_multiple_of(16)),
        "RoPE's tensors 16-byte aligned"
    );
    let dims = sizes.map(|d| d as u32);
    let mut launch = k.stream.launch_builder(function);
    for arg in &args {
        launch.arg(arg);
    }
    for dim in &dims {
        launch.arg(dim);
    }
    let [tokens, _, h, kvh, hd, _] = sizes;
    // SAFETY: the callers checked every tensor contiguous, of the sizes the kernel indexes,
    // alive until the launch is ordered on their stream.
    unsafe { launch.launch(grid(k, (tokens * (h + kvh) * hd / 16) as usize)) }
        .expect("launching a RoPE kernel");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest difference between two bf16 tensors, in units of the larger's bf16 spacing.
    fn ulps(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_kind(Kind::Float), b.to_kind(Kind::Float));
        let spacing = a.abs().maximum(&b.abs()).clamp_min(1e-30) * (2f64).powi(-7);
        f64::try_from(((&a - &b).abs() / spacing).max()).unwrap()
    }

    /// What every kernel computes and where it reads and writes, without a GPU: the source
    /// compiled as C++ against a shim that runs each block's threads as host threads
    /// (`cuda_emulation/shim.h`), each kernel checked against its formula
    /// (`cuda_emulation/check.cpp`: SwiGLU and its gradient with and without the down
    /// projection's `A` gradient, RoPE both ways, RMSNorm's gradient, the cross-entropy). The
    /// `_on_cuda` tests below check the same on the GPU, against libtorch.
    #[test]
    fn the_kernels_compute_their_formulas_emulated_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kernels.cu.inc"), SOURCE).unwrap();
        let here =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/cuda_emulation");
        let exe = dir.path().join("check");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        let built = std::process::Command::new(&compiler)
            .args(["-std=c++20", "-O1", "-pthread", "-w", "-I"])
            .arg(&here)
            .arg("-I")
            .arg(dir.path())
            .arg(here.join("check.cpp"))
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
        assert!(
            built.status.success(),
            "compiling the emulation: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let run = std::process::Command::new(&exe).output().unwrap();
        let report = String::from_utf8_lossy(&run.stdout);
        println!("{report}");
        assert!(
            run.status.success() && report.contains("all match"),
            "{report}"
        );
    }

    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn fused_swiglu_matches_libtorch_on_cuda() {
        let device = Device::Cuda(0);
        tch::manual_seed(7);
        // Odd rows, and an intermediate size that is a multiple of 8 but not of 256.
        let (rows, inter) = (37, 5632 / 4 + 8);
        let gate_up =
            (Tensor::randn([rows, 2 * inter], (Kind::Float, device)) * 3.0).to_kind(Kind::BFloat16);
        let d_out = Tensor::randn([rows, inter], (Kind::Float, device)).to_kind(Kind::BFloat16);
        let gate = gate_up.narrow(1, 0, inter);
        let up = gate_up.narrow(1, inter, inter);
        let expected = gate.silu() * &up;
        let fused = swiglu(&gate_up).expect("the kernels compile and apply");
        assert!(ulps(&fused, &expected) <= 1.0, "forward");

        let d_gate = gate.silu_backward(&(&d_out * &up));
        let d_up = &d_out * gate.silu();
        let (d_gate_up, gated) = swiglu_backward(&gate_up, &d_out, true).unwrap();
        assert!(
            ulps(&d_gate_up.narrow(1, 0, inter), &d_gate) <= 1.0,
            "d gate"
        );
        assert!(
            ulps(&d_gate_up.narrow(1, inter, inter), &d_up) <= 1.0,
            "d up"
        );
        assert!(ulps(&gated.unwrap(), &expected) <= 1.0, "gated again");
        assert!(swiglu_backward(&gate_up, &d_out, false)
            .unwrap()
            .1
            .is_none());

        // With the down projection's A gradient folded in: the same d_gate_up bit for bit, and
        // dh^T gated as fp32 sums over the bf16 operands (row tiles: one full, one partial).
        for (rows, rank) in [(300, 16), (37, 5), (LORA_ROWS, LORA_MAX_RANK)] {
            let gate_up = (Tensor::randn([rows, 2 * inter], (Kind::Float, device)) * 3.0)
                .to_kind(Kind::BFloat16);
            let d_out = Tensor::randn([rows, inter], (Kind::Float, device)).to_kind(Kind::BFloat16);
            let dh = Tensor::randn([rows, rank], (Kind::Float, device)).to_kind(Kind::BFloat16);
            let (want_d, gated) = swiglu_backward(&gate_up, &d_out, true).unwrap();
            let want_a = dh
                .to_kind(Kind::Float)
                .tr()
                .mm(&gated.unwrap().to_kind(Kind::Float));
            let (d_gate_up, a_grad) =
                swiglu_backward_with_a_grad(&gate_up, &d_out, &dh).expect("applies");
            assert_eq!(ulps(&d_gate_up, &want_d), 0.0, "d_gate_up, {rows} rows");
            assert_eq!(a_grad.size(), [rank, inter]);
            assert!(
                relative_gap(&a_grad, &want_a) < 1e-5,
                "A gradient, rank {rank}"
            );
        }
        let too_wide = Tensor::zeros([4, LORA_MAX_RANK + 1], (Kind::BFloat16, device));
        let (gate_up, d_out) = (gate_up.narrow(0, 0, 4), d_out.narrow(0, 0, 4));
        assert!(swiglu_backward_with_a_grad(&gate_up.contiguous(), &d_out, &too_wide).is_none());
    }

    /// The largest difference between `got` (bf16) and `want` (fp32), over `want`'s largest
    /// magnitude.
    fn relative_gap(got: &Tensor, want: &Tensor) -> f64 {
        let gap = (got.to_kind(Kind::Float) - want).abs().max();
        f64::try_from(gap / want.abs().max()).unwrap()
    }

    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn fused_rope_and_rms_norm_backward_match_their_formulas_on_cuda() {
        let device = Device::Cuda(0);
        tch::manual_seed(11);
        let bf16 = |t: Tensor| t.to_kind(Kind::BFloat16);
        let (batch, seq, h, kvh, hd) = (2, 6, 4, 2, 16);
        let (tokens, width) = (batch * seq, (h + 2 * kvh) * hd);
        let qkv = bf16(Tensor::randn([tokens, width], (Kind::Float, device)));
        let (cos, sin) = (
            bf16(Tensor::rand([seq, hd], (Kind::Float, device))),
            bf16(Tensor::rand([seq, hd], (Kind::Float, device))),
        );
        let (q, k) = rope(&qkv, &cos, &sin, (h, kvh, hd)).expect("the kernels apply");
        // libtorch's rotate_half formula in bf16, as the model's forward computes it.
        let half = hd / 2;
        let reference = |offset: i64, n: i64| {
            let x = qkv.narrow(1, offset, n * hd).view([batch, seq, n, hd]);
            let (c, s) = (cos.view([1, seq, 1, hd]), sin.view([1, seq, 1, hd]));
            let rotated = Tensor::cat(&[-x.narrow(-1, half, half), x.narrow(-1, 0, half)], -1);
            (&x * c + rotated * s).view([tokens, n, hd])
        };
        assert!(ulps(&q, &reference(0, h)) <= 1.0, "q");
        assert!(ulps(&k, &reference(h * hd, kvh)) <= 1.0, "k");

        let (dq, dk) = (
            bf16(Tensor::randn([tokens, h, hd], (Kind::Float, device))),
            bf16(Tensor::randn([tokens, kvh, hd], (Kind::Float, device))),
        );
        let d_qkv = Tensor::zeros([tokens, width], (Kind::BFloat16, device));
        assert!(rope_backward(&dq, &dk, &cos, &sin, &d_qkv, (h, kvh, hd)));
        // dx = dy cos + (dy2 sin2, -dy1 sin1), in fp32.
        for (d, offset, n) in [(&dq, 0, h), (&dk, h * hd, kvh)] {
            let dy = d.to_kind(Kind::Float).view([batch, seq, n, hd]);
            let (c, s) = (
                cos.to_kind(Kind::Float).view([1, seq, 1, hd]),
                sin.to_kind(Kind::Float).view([1, seq, 1, hd]),
            );
            let ds = &dy * s;
            let swapped = Tensor::cat(&[ds.narrow(-1, half, half), -ds.narrow(-1, 0, half)], -1);
            let want = (dy * c + swapped).view([tokens, n * hd]);
            assert!(
                relative_gap(&d_qkv.narrow(1, offset, n * hd), &want) < 1e-2,
                "d {offset}"
            );
        }
        assert_eq!(
            f64::try_from(d_qkv.narrow(1, (h + kvh) * hd, kvh * hd).abs().max()).unwrap(),
            0.0
        );

        let (rows, cols) = (37, 4096 + 64);
        let x = bf16(Tensor::randn([rows, cols], (Kind::Float, device)));
        let w = bf16(Tensor::rand([cols], (Kind::Float, device)) + 0.5);
        let (_, rstd) = x.internal_fused_rms_norm([cols], Some(&w), 1e-5);
        let dy = bf16(Tensor::randn([rows, cols], (Kind::Float, device)));
        let residual = bf16(Tensor::randn([rows, cols], (Kind::Float, device)));
        let dx = rms_norm_backward(&dy, &x, &rstd, &w, Some(&residual)).expect("applies");
        let xf = x.to_kind(Kind::Float) * &rstd;
        let dyw = dy.to_kind(Kind::Float) * w.to_kind(Kind::Float);
        let mean = (&dyw * &xf).mean_dim(-1, true, Kind::Float);
        let want = (dyw - xf * mean) * &rstd + residual.to_kind(Kind::Float);
        assert!(relative_gap(&dx, &want) < 1e-2, "rms norm backward");
    }

    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn fused_cross_entropy_matches_libtorch_on_cuda() {
        let device = Device::Cuda(0);
        tch::manual_seed(13);
        // Rows of wide logits (some large, as a trained model's are), a vocabulary a multiple
        // of 8 but not of 1024 threads' reach.
        let (rows, vocab) = (37, 128_256 / 8 + 8);
        let logits =
            (Tensor::randn([rows, vocab], (Kind::Float, device)) * 8.0).to_kind(Kind::BFloat16);
        let targets = Tensor::randint(vocab, [rows], (Kind::Int64, device));
        let _ = targets.narrow(0, 0, 1).fill_(vocab - 1);
        let _ = targets.narrow(0, 1, 1).fill_(0);
        let f = logits.to_kind(Kind::Float);
        let lse = f.logsumexp([-1], true);
        let want_loss = (&lse - f.gather(1, &targets.unsqueeze(1), false)).squeeze_dim(1);
        let mut want_grad = (&f - &lse).exp();
        let minus_one = Tensor::full([rows, 1], -1.0, (Kind::Float, device));
        let _ = want_grad.scatter_add_(1, &targets.unsqueeze(1), &minus_one);
        let want_grad = want_grad.to_kind(Kind::BFloat16);

        let loss = cross_entropy(&logits, &targets, false).expect("the kernels apply");
        let gap = f64::try_from((&loss - &want_loss).abs().max()).unwrap();
        assert!(gap < 1e-4, "loss: {gap}");
        let grad = logits.copy();
        let again = cross_entropy(&grad, &targets, true).unwrap();
        assert!(f64::try_from((&again - &loss).abs().max()).unwrap() == 0.0);
        // exp of the same fp32 difference up to lse's last bits: at most one bf16 step apart.
        assert!(ulps(&grad, &want_grad) <= 1.0, "gradient");
    }

    /// The residual's sum is libtorch's add bit for bit, its norm aten's fused RMSNorm of it
    /// to within a bf16 step, the row scales to fp32's rounding; rows wider than a block.
    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn fused_add_rms_norm_matches_aten_on_cuda() {
        let opts = (Kind::Float, Device::Cuda(0));
        tch::manual_seed(19);
        let bf = |t: Tensor| t.to_kind(Kind::BFloat16);
        let (x, y) = (
            bf(Tensor::randn([37, 4104], opts) * 3.0),
            bf(Tensor::randn([37, 4104], opts)),
        );
        let w = bf(Tensor::randn([4104], opts));
        let (sum, normed, rstd) = add_rms_norm(&x, &y, &w, 1e-5).expect("the kernel applies");
        let want_sum = &x + &y;
        let (want, want_rstd) = want_sum.internal_fused_rms_norm([4104], Some(&w), 1e-5);
        assert!(sum.equal(&want_sum), "the sum");
        assert!(ulps(&normed, &want) <= 1.0, "the norm");
        assert!(
            relative_gap(&rstd.view([-1]), &want_rstd.view([-1])) < 1e-6,
            "rstd"
        );
    }

    /// The packed factors are what libtorch's casts, concatenation and block copies give, bit
    /// for bit: q and v with branches of ranks 16 and 8 (their scalings differ), k without.
    #[test]
    #[ignore = "needs a CUDA GPU with NVRTC: run on the GPU machine (bench/gpu.md, \"Correctness on the GPU\")"]
    fn packed_factors_match_libtorch_on_cuda() {
        let opts = (Kind::Float, Device::Cuda(0));
        tch::manual_seed(17);
        let (inputs, outs) = (1000, [1024, 256, 256]);
        let (a0, b0) = (
            Tensor::randn([16, inputs], opts),
            Tensor::randn([outs[0], 16], opts),
        );
        let (a2, b2) = (
            Tensor::randn([8, inputs], opts),
            Tensor::randn([outs[2], 8], opts),
        );
        let parts = [
            LoraPart {
                a: &a0,
                b: &b0,
                scaling: 2.0,
                row: 0,
            },
            LoraPart {
                a: &a2,
                b: &b2,
                scaling: 0.7,
                row: outs[0] + outs[1],
            },
        ];
        let rows = outs.iter().sum::<i64>();
        let (a, b) = pack_lora(&parts, rows).expect("the kernel applies");
        let want_a = Tensor::cat(&[&a0, &a2], 0).to_kind(Kind::BFloat16);
        let want_b = Tensor::zeros([rows, 24], (Kind::BFloat16, opts.1));
        want_b
            .narrow(0, 0, outs[0])
            .narrow(1, 0, 16)
            .copy_(&(&b0 * 2.0));
        want_b
            .narrow(0, outs[0] + outs[1], outs[2])
            .narrow(1, 16, 8)
            .copy_(&(&b2 * 0.7));
        assert!(a.equal(&want_a), "A stacked");
        assert!(b.equal(&want_b), "B block-diagonal");
    }

    /// NVRTC needs no GPU: every kernel's source compiles on any machine with the library (in
    /// CI, PyTorch's `nvidia-cuda-nvrtc` package, which .ci/env.sh puts on `LD_LIBRARY_PATH`),
    /// so a kernel that would not compile fails here rather than on the GPU machine.
    #[test]
    fn the_kernels_compile_with_nvrtc() {
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE).expect("the kernels compile");
        let text = ptx.to_src();
        for name in [
            "swiglu_forward",
            "swiglu_backward",
            "swiglu_backward_lora",
            "rms_norm_backward",
            "rope_forward",
            "rope_backward",
            "cross_entropy_forward",
            "cross_entropy_backward",
            "pack_lora",
            "add_rms_norm",
            "adamw_step",
        ] {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "{name} in the PTX"
            );
        }
    }

    #[test]
    fn the_kernels_do_not_apply_on_the_cpu_or_outside_bf16() {
        let cpu = Tensor::zeros([4, 32], (Kind::BFloat16, Device::Cpu));
        assert!(swiglu(&cpu).is_none());
        assert!(swiglu_shape(&Tensor::zeros([4, 32], (Kind::Float, Device::Cpu))).is_none());
        assert!(swiglu_shape(&Tensor::zeros([4, 24], (Kind::BFloat16, Device::Cpu))).is_none());
        assert_eq!(swiglu_shape(&cpu), Some((4, 2)));
        let targets = Tensor::zeros([4], (Kind::Int64, Device::Cpu));
        assert!(cross_entropy(&cpu, &targets, true).is_none());
    }
}
