// Runs the trainer's CUDA kernels (model/cuda_kernels.rs, SOURCE) on the CPU, for a test
// without a GPU (`the_kernels_compute_their_formulas_emulated_on_the_cpu`): the kernel source
// is compiled as C++ against these stand-ins for CUDA's built-ins, and `launch` runs a grid's
// blocks one after another, each block's threads as host threads. `__syncthreads` is a barrier
// across the block, a warp shuffle two (every kernel shuffles with all of a block's threads
// taking part), and `__shared__` memory is static, which the one running block owns. It
// checks what the kernels compute and where they read and write, not their speed.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>
#include <thread>
#include <barrier>
#include <vector>
#include <algorithm>
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static inline float2 make_float2(float a, float b) { return {a, b}; }
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::barrier<>* block_barrier;
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
static float shfl_slots[1024];
static inline float __shfl_xor_sync(unsigned, float v, int o) {
  shfl_slots[threadIdx.x] = v; block_barrier->arrive_and_wait();
  float r = shfl_slots[threadIdx.x ^ o]; block_barrier->arrive_and_wait(); return r;
}
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
using std::min;
// Correctly rounded fp32 arithmetic, as on the GPU (no contraction into fused multiply-adds:
// C++20 builds with -ffp-contract=off and no FMA instructions are asked for).
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
template <typename F> void launch(dim3 grid, unsigned threads, F f) {
  gridDim = grid; blockDim.x = threads;
  for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(threads); block_barrier = &bar;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; f(); });
    for (auto& t : ts) t.join();
  }
}
