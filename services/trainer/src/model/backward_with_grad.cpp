// The one libtorch call the trainer needs that tch does not bind: autograd's backward from an
// output with that output's gradient given (tch's `backward` takes a scalar and seeds it with
// one). Built by build.rs against the libtorch headers tch builds against; model/backward_with_grad.rs
// is its Rust side. A failure comes back as its message (the caller frees it), never as a C++
// exception across the boundary.
#include <torch/csrc/autograd/autograd.h>
#include <cstdlib>
#include <cstring>

extern "C" char* loraforge_backward_with_grad(const at::Tensor* output, const at::Tensor* grad) {
  try {
    torch::autograd::backward({*output}, {*grad});
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  }
}
