//! Which fused attention kernel libtorch's `scaled_dot_product_attention` tries first on CUDA.
//!
//! PyTorch tries FlashAttention first, then memory-efficient attention, the composite, and
//! cuDNN's last. On an H100 with Llama-3-8B's attention (32 query heads over 8 key/value
//! heads of 128, seq 2048, bf16, causal) cuDNN's forward and backward take 0.65 ms a layer
//! where FlashAttention's take 1.17 (bench/gpu.md, `bench/gemm_floor.py`): 17 ms of a step
//! of 32 layers. So the trainer moves cuDNN to the front once it runs on CUDA; a call cuDNN
//! cannot take (its shapes, a mask) still falls to the next backend, as before.
//! `LORAFORGE_ATTENTION=torch` keeps PyTorch's order (to compare, or should a cuDNN release
//! misbehave).
//!
//! tch has no binding for the order, so `attention_backend.cpp` sets it through libtorch's
//! C++ API (compiled by build.rs).

use std::sync::Once;

extern "C" {
    fn loraforge_prefer_cudnn_attention() -> i32;
}

/// Puts cuDNN's attention first (once per process), unless `LORAFORGE_ATTENTION=torch`.
pub fn choose_for_cuda() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var("LORAFORGE_ATTENTION").is_ok_and(|v| v == "torch") {
            tracing::info!("attention: PyTorch's backend order (LORAFORGE_ATTENTION=torch)");
            return;
        }
        // SAFETY: a C function of ours without arguments; it catches every C++ exception.
        match unsafe { loraforge_prefer_cudnn_attention() } {
            0 => tracing::info!("attention: cuDNN's kernel first"),
            _ => tracing::warn!("attention: could not put cuDNN first; PyTorch's order stays"),
        }
    });
}

#[cfg(test)]
extern "C" {
    fn loraforge_sdp_priority_order(out: *mut i64, capacity: usize) -> usize;
}

/// libtorch's current order, as backend numbers (`at::SDPBackend`).
#[cfg(test)]
fn priority_order() -> Vec<i64> {
    let mut out = [0i64; 16];
    // SAFETY: the function writes at most `capacity` entries into `out`.
    let n = unsafe { loraforge_sdp_priority_order(out.as_mut_ptr(), out.len()) };
    out[..n.min(out.len())].to_vec()
}

#[cfg(test)]
mod tests {
    /// The order is libtorch's global state: after the call cuDNN's backend comes first and
    /// every other backend is still there, in its old order (checked through the same C++
    /// API the call uses, read back by `loraforge_sdp_priority_order` below).
    #[test]
    fn cudnn_attention_comes_first_and_the_rest_keep_their_order() {
        let before = super::priority_order();
        super::choose_for_cuda();
        let after = super::priority_order();
        const CUDNN: i64 = 3;
        assert_eq!(after[0], CUDNN, "{after:?}");
        let rest: Vec<i64> = before.iter().copied().filter(|&b| b != CUDNN).collect();
        assert_eq!(after[1..], rest[..], "{before:?} -> {after:?}");
    }
}
