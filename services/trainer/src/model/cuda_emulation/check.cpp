// The CUDA kernels against their formulas, on the CPU (shim.h). Built and run by
// `the_kernels_compute_their_formulas_emulated_on_the_cpu` (model/cuda_kernels.rs), which writes
// the kernels' source beside it as kernels.cu.inc; prints one line a check, exits 1 on a
// mismatch. The references are the formulas the kernels' comments state, in double or with
// the same bf16 roundings.
#include "shim.h"
#include <cstdio>
#include <random>
#include "kernels.cu.inc"
static std::mt19937 rng(5);
static bf16 rb(float scale = 1.f) { std::normal_distribution<float> n(0.f, scale); return store(n(rng)); }
static float L(bf16 b) { return load(b); }
int main() {
  int bad = 0;
  // --- swiglu_backward_lora vs swiglu_backward + dh^T gated
  for (auto [rows, rank] : std::vector<std::pair<unsigned,unsigned>>{{300,16},{37,5},{256,32}}) {
    unsigned inter = 1416, pairs = inter / 2, vecs = inter / 8;
    std::vector<bf16> gu(rows * 2 * inter), dout(rows * inter), dh(rows * rank);
    for (auto& v : gu) v = rb(3.f); for (auto& v : dout) v = rb(); for (auto& v : dh) v = rb();
    std::vector<bf16> dgu1(rows * 2 * inter), gated(rows * inter), dgu2(rows * 2 * inter);
    launch({4,1,1}, 256, [&] { swiglu_backward((const uint4*)gu.data(), (const uint4*)dout.data(), (uint4*)dgu1.data(), (uint4*)gated.data(), rows, vecs); });
    unsigned tiles = (rows + 255) / 256;
    std::vector<float> partial(tiles * rank * inter, -7.f);
    launch({(pairs + 255) / 256, tiles, 1}, 256, [&] { swiglu_backward_lora((const u32*)gu.data(), (const u32*)dout.data(), (u32*)dgu2.data(), dh.data(), partial.data(), rows, pairs, rank); });
    int diff = 0; for (size_t i = 0; i < dgu1.size(); ++i) diff += dgu1[i] != dgu2[i];
    double maxrel = 0, maxv = 0;
    for (unsigned r = 0; r < rank; ++r) for (unsigned c = 0; c < inter; ++c) {
      double want = 0; for (unsigned t = 0; t < rows; ++t) want += (double)L(dh[t*rank+r]) * L(gated[t*inter+c]);
      double got = 0; for (unsigned tl = 0; tl < tiles; ++tl) got += partial[(tl*rank + r)*inter + c];
      maxrel = std::max(maxrel, std::fabs(got - want)); maxv = std::max(maxv, std::fabs(want));
    }
    printf("swiglu_lora rows %u rank %u: d_gate_up differing %d, A grad gap %.3g of %.3g\n", rows, rank, diff, maxrel, maxv);
    bad += diff != 0 || maxrel / maxv > 1e-5;
  }
  // --- rope forward/backward vs the scalar formulas
  struct Case { unsigned batch, seq, h, kvh, hd; };
  for (Case cs : {Case{2,6,4,2,16}, Case{2,4,4,2,128}, Case{1,3,3,1,32}}) {
    unsigned tokens = cs.batch * cs.seq, width = (cs.h + 2 * cs.kvh) * cs.hd + 8, half = cs.hd / 2;
    std::vector<bf16> qkv(tokens * width), c(cs.seq * cs.hd), s(cs.seq * cs.hd), q(tokens * cs.h * cs.hd), k(tokens * cs.kvh * cs.hd);
    for (auto& v : qkv) v = rb(); for (auto& v : c) v = rb(); for (auto& v : s) v = rb();
    unsigned items = tokens * (cs.h + cs.kvh) * cs.hd / 16;
    launch({(items + 255) / 256, 1, 1}, 256, [&] { rope_forward(qkv.data(), c.data(), s.data(), q.data(), k.data(), tokens, cs.seq, cs.h, cs.kvh, cs.hd, width); });
    int diff = 0;
    std::vector<bf16> dq(q.size()), dk(k.size()), dqkv(tokens * width, 0);
    for (auto& v : dq) v = rb(); for (auto& v : dk) v = rb();
    launch({(items + 255) / 256, 1, 1}, 256, [&] { rope_backward(dq.data(), dk.data(), c.data(), s.data(), dqkv.data(), tokens, cs.seq, cs.h, cs.kvh, cs.hd, width); });
    int bdiff = 0;
    for (unsigned t = 0; t < tokens; ++t) for (unsigned head = 0; head < cs.h + cs.kvh; ++head) for (unsigned j = 0; j < half; ++j) {
      const bf16* src = &qkv[t * width + head * cs.hd]; unsigned pos = t % cs.seq;
      const bf16* cc = &c[pos * cs.hd]; const bf16* ss = &s[pos * cs.hd];
      float x1 = L(src[j]), x2 = L(src[j + half]);
      bf16 y1 = store(round_bf16(x1 * L(cc[j])) + round_bf16(-x2 * L(ss[j])));
      bf16 y2 = store(round_bf16(x2 * L(cc[j + half])) + round_bf16(x1 * L(ss[j + half])));
      bf16* dst = head < cs.h ? &q[(t * cs.h + head) * cs.hd] : &k[(t * cs.kvh + head - cs.h) * cs.hd];
      diff += (dst[j] != y1) + (dst[j + half] != y2);
      const bf16* d = head < cs.h ? &dq[(t * cs.h + head) * cs.hd] : &dk[(t * cs.kvh + head - cs.h) * cs.hd];
      float d1 = L(d[j]), d2 = L(d[j + half]);
      bf16 e1 = store(d1 * L(cc[j]) + d2 * L(ss[j + half])), e2 = store(d2 * L(cc[j + half]) - d1 * L(ss[j]));
      bf16* o = &dqkv[t * width + head * cs.hd];
      bdiff += (o[j] != e1) + (o[j + half] != e2);
    }
    int untouched = 0; for (unsigned t = 0; t < tokens; ++t) for (unsigned x = (cs.h + cs.kvh) * cs.hd; x < width; ++x) untouched += dqkv[t * width + x] != 0;
    printf("rope hd %u: forward differing %d, backward differing %d, written outside q/k %d\n", cs.hd, diff, bdiff, untouched);
    bad += diff + bdiff + untouched;
  }
  // --- rms_norm_backward vs the formula
  {
    unsigned rows = 5, cols = 4160;
    std::vector<bf16> dy(rows * cols), x(rows * cols), w(cols), res(rows * cols), dx(rows * cols);
    std::vector<float> rstd(rows);
    for (auto& v : dy) v = rb(); for (auto& v : x) v = rb(); for (auto& v : w) v = rb(); for (auto& v : res) v = rb();
    for (unsigned r = 0; r < rows; ++r) { double ss = 0; for (unsigned c2 = 0; c2 < cols; ++c2) ss += L(x[r*cols+c2]) * L(x[r*cols+c2]); rstd[r] = 1.0 / std::sqrt(ss / cols + 1e-5); }
    for (int with_res = 0; with_res < 2; ++with_res) {
      launch({3,1,1}, 256, [&] { rms_norm_backward((const uint4*)dy.data(), (const uint4*)x.data(), rstd.data(), (const uint4*)w.data(), with_res ? (const uint4*)res.data() : nullptr, (uint4*)dx.data(), rows, cols / 8); });
      double gap = 0, top = 0;
      for (unsigned r = 0; r < rows; ++r) {
        double mean = 0; for (unsigned c2 = 0; c2 < cols; ++c2) mean += (double)L(dy[r*cols+c2]) * L(w[c2]) * L(x[r*cols+c2]) * rstd[r]; mean /= cols;
        for (unsigned c2 = 0; c2 < cols; ++c2) {
          double want = rstd[r] * (L(dy[r*cols+c2]) * L(w[c2]) - L(x[r*cols+c2]) * rstd[r] * mean) + (with_res ? L(res[r*cols+c2]) : 0);
          gap = std::max(gap, std::fabs(L(dx[r*cols+c2]) - want)); top = std::max(top, std::fabs(want));
        }
      }
      printf("rms_norm_backward residual %d: gap %.3g of %.3g\n", with_res, gap, top);
      bad += gap / top > 1e-2;
    }
  }
  // --- swiglu_forward: silu(gate) * up, rounded where libtorch rounds
  {
    unsigned rows = 7, inter = 1416, vecs = inter / 8;
    std::vector<bf16> gu(rows * 2 * inter), out(rows * inter);
    for (auto& v : gu) v = rb(3.f);
    launch({2,1,1}, 256, [&] { swiglu_forward((const uint4*)gu.data(), (uint4*)out.data(), rows, vecs); });
    int diff = 0;
    for (unsigned t = 0; t < rows; ++t) for (unsigned j = 0; j < inter; ++j) {
      float x = L(gu[t * 2 * inter + j]), up = L(gu[t * 2 * inter + inter + j]);
      diff += out[t * inter + j] != store(round_bf16(x / (1.0f + expf(-x))) * up);
    }
    printf("swiglu_forward: differing %d\n", diff);
    bad += diff;
  }
  // --- cross_entropy_forward/backward: log-sum-exp, loss, softmax - onehot
  {
    unsigned rows = 6, vocab = 1000, vecs = vocab / 8;
    std::vector<bf16> logits(rows * vocab);
    for (auto& v : logits) v = rb(3.f);
    std::vector<long long> targets(rows);
    for (unsigned r = 0; r < rows; ++r) targets[r] = (r * 389 + 11) % vocab;
    std::vector<float> lse(rows), loss(rows);
    std::vector<bf16> before = logits;
    launch({4,1,1}, 256, [&] { cross_entropy_forward((const uint4*)logits.data(), targets.data(), lse.data(), loss.data(), rows, vecs); });
    launch({3,1,1}, 256, [&] { cross_entropy_backward((uint4*)logits.data(), targets.data(), lse.data(), rows, vecs); });
    double lgap = 0, ggap = 0;
    for (unsigned r = 0; r < rows; ++r) {
      double m = -1e30, sum = 0;
      for (unsigned v = 0; v < vocab; ++v) m = std::max(m, (double)L(before[r * vocab + v]));
      for (unsigned v = 0; v < vocab; ++v) sum += std::exp(L(before[r * vocab + v]) - m);
      double want_lse = m + std::log(sum);
      lgap = std::max({lgap, std::fabs(lse[r] - want_lse), std::fabs(loss[r] - (want_lse - L(before[r * vocab + targets[r]])))});
      for (unsigned v = 0; v < vocab; ++v) {
        double g = std::exp(L(before[r * vocab + v]) - want_lse) - (v == targets[r]);
        ggap = std::max(ggap, std::fabs(L(logits[r * vocab + v]) - g));
      }
    }
    printf("cross_entropy: loss gap %.3g, gradient gap %.3g\n", lgap, ggap);
    bad += lgap > 1e-4 || ggap > 4e-3;
  }
  // --- pack_lora: the parts' A stacked and their scaled B block-diagonal, zeros elsewhere
  {
    // q, k (no adapter: its rows stay zero) and v, as in a merged q/k/v with two branches.
    unsigned in = 40, outs[3] = {24, 8, 8}, ranks[2] = {4, 3}, rows = 40, total_r = 7;
    std::vector<float> a0(ranks[0] * in), a1(ranks[1] * in), b0(outs[0] * ranks[0]), b1(outs[2] * ranks[1]);
    std::normal_distribution<float> n(0.f, 1.f);
    for (auto* v : {&a0, &a1, &b0, &b1}) for (auto& x : *v) x = n(rng);
    PackParts parts{};
    parts.p[0] = {a0.data(), b0.data(), ranks[0], 0, outs[0], 2.0f};
    parts.p[1] = {a1.data(), b1.data(), ranks[1], outs[0] + outs[1], outs[2], 0.75f};
    parts.count = 2;
    std::vector<bf16> a_out(total_r * in, 7), b_out(rows * total_r, 7);
    launch({2,1,1}, 256, [&] { pack_lora(parts, a_out.data(), b_out.data(), in, rows, total_r); });
    int diff = 0;
    for (unsigned r = 0; r < total_r; ++r) for (unsigned c = 0; c < in; ++c)
      diff += a_out[r * in + c] != store(r < ranks[0] ? a0[r * in + c] : a1[(r - ranks[0]) * in + c]);
    for (unsigned r = 0; r < rows; ++r) for (unsigned c = 0; c < total_r; ++c) {
      float want = 0.f;
      if (r < outs[0] && c < ranks[0]) want = 2.0f * b0[r * ranks[0] + c];
      if (r >= outs[0] + outs[1] && c >= ranks[0]) want = 0.75f * b1[(r - outs[0] - outs[1]) * ranks[1] + c - ranks[0]];
      diff += b_out[r * total_r + c] != store(want);
    }
    printf("pack_lora: differing %d\n", diff);
    bad += diff;
  }
  // --- add_rms_norm: the sum rounded as an add, its norm in fp32, rounded once
  {
    unsigned rows = 5, cols = 4160;
    std::vector<bf16> x(rows * cols), y(rows * cols), w(cols), sum(rows * cols), out(rows * cols);
    std::vector<float> rstd(rows);
    for (auto& v : x) v = rb(); for (auto& v : y) v = rb(0.1f); for (auto& v : w) v = rb();
    launch({3,1,1}, 256, [&] { add_rms_norm((const uint4*)x.data(), (const uint4*)y.data(), (const uint4*)w.data(), (uint4*)sum.data(), (uint4*)out.data(), rstd.data(), rows, cols / 8, 1e-5f); });
    int sum_diff = 0; double rgap = 0, ugap = 0;
    for (unsigned r = 0; r < rows; ++r) {
      double ss = 0;
      for (unsigned c2 = 0; c2 < cols; ++c2) {
        bf16 want = store(L(x[r*cols+c2]) + L(y[r*cols+c2]));
        sum_diff += sum[r*cols+c2] != want; ss += (double)L(want) * L(want);
      }
      double want_r = 1.0 / std::sqrt(ss / cols + 1e-5);
      rgap = std::max(rgap, std::fabs(rstd[r] - want_r) / want_r);
      for (unsigned c2 = 0; c2 < cols; ++c2) {
        double want = (double)L(sum[r*cols+c2]) * want_r * L(w[c2]);
        double spacing = std::max(std::fabs(want), 1e-30) * std::pow(2.0, -7);
        ugap = std::max(ugap, std::fabs(L(out[r*cols+c2]) - want) / spacing);
      }
    }
    printf("add_rms_norm: sums differing %d, rstd gap %.3g, normed within %.2f bf16 steps\n", sum_diff, rgap, ugap);
    bad += sum_diff != 0 || rgap > 1e-6 || ugap > 0.51;
  }
  // --- adamw_step: torch.optim.AdamW's single-tensor operations, each rounded in fp32
  {
    size_t n = 3000;
    std::normal_distribution<float> nd(0.f, 1.f);
    std::vector<float> p(n), g(n), m(n), v(n);
    for (size_t i = 0; i < n; ++i) { p[i] = nd(rng); g[i] = nd(rng) * 1e-2f; m[i] = nd(rng) * 1e-3f; v[i] = std::fabs(nd(rng)) * 1e-5f; }
    std::vector<float> p0 = p, m0 = m, v0 = v;
    double lr = 2e-4, wd = 0.01, b1 = 0.9, b2 = 0.999, step_size = lr / (1 - std::pow(b1, 3)), bc2 = std::sqrt(1 - std::pow(b2, 3));
    float c[7] = {(float)(1 - lr * wd), (float)(1 - b1), (float)b2, (float)(1 - b2), (float)-step_size, (float)bc2, 1e-8f};
    launch({2,1,1}, 256, [&] { adamw_step(p.data(), g.data(), m.data(), v.data(), n, c[0], c[1], c[2], c[3], c[4], c[5], c[6]); });
    int diff = 0;
    for (size_t i = 0; i < n; ++i) {
      // The libtorch kernels one by one: mul_, lerp_, mul_, (g * c) * g, add_, sqrt, div, add, mul, div, add_.
      volatile float pi = p0[i] * c[0];
      volatile float mi = m0[i] + c[1] * (g[i] - m0[i]);
      volatile float t = g[i] * c[3]; t = t * g[i];
      volatile float vi = v0[i] * c[2]; vi = vi + t;
      volatile float d = std::sqrt((float)vi); d = d / c[5]; d = d + c[6];
      volatile float u = mi * c[4]; u = u / d;
      float want = pi + u;
      diff += p[i] != want || m[i] != mi || v[i] != vi;
    }
    printf("adamw_step: differing %d of %zu\n", diff, n);
    bad += diff;
  }
  printf(bad ? "FAILED\n" : "all match\n");
  return bad != 0;
}
