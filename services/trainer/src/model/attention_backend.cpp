// Which fused kernel libtorch's scaled_dot_product_attention tries first on CUDA
// (model/attention_backend.rs says why). tch has no binding for the SDP priority order, so this
// one function reaches at::Context directly; it is compiled by build.rs against the same
// libtorch headers tch builds with.
#include <ATen/Context.h>

#include <cstdint>
#include <vector>

// Moves cuDNN's attention to the front of the priority order, keeping the others' order after
// it (a backend that cannot take a call's shapes is skipped, as before). 0 on success.
extern "C" int loraforge_prefer_cudnn_attention() {
  try {
    auto& context = at::globalContext();
    const auto cudnn = at::SDPBackend::cudnn_attention;
    std::vector<int64_t> order{static_cast<int64_t>(cudnn)};
    for (auto backend : context.sDPPriorityOrder()) {
      if (backend != cudnn) {
        order.push_back(static_cast<int64_t>(backend));
      }
    }
    context.setSDPPriorityOrder(order);
    return 0;
  } catch (...) {
    return 1;
  }
}

// The current order as backend numbers (at::SDPBackend), for the test: writes at most
// `capacity` of them to `out` and returns how many there are.
extern "C" size_t loraforge_sdp_priority_order(int64_t* out, size_t capacity) {
  const auto order = at::globalContext().sDPPriorityOrder();
  for (size_t i = 0; i < order.size() && i < capacity; ++i) {
    out[i] = static_cast<int64_t>(order[i]);
  }
  return order.size();
}
