//! Autograd's backward from a non-scalar output with its gradient given, which tch's `backward`
//! (a scalar, seeded with one) does not offer: the layer by hand runs attention's backward on
//! attention's own small graph this way, and a layer left to autograd its whole graph
//! (model/llama/layer_backward.rs). Without it the
//! gradient went in through a surrogate, the dot product of the output with its gradient,
//! whose forward and backward read and wrote the `(tokens, hidden)` output three more times a
//! layer (on Llama-3-8B about 80 µs a layer on an H100, bench/gpu.md). The call is a few lines
//! of C++ (`backward_with_grad.cpp`, built by build.rs against the libtorch tch builds
//! against); where it was not built (no libtorch headers found) the surrogate stands in.

use tch::Tensor;

#[cfg(backward_with_grad)]
extern "C" {
    fn loraforge_backward_with_grad(
        output: *const torch_sys::C_tensor,
        grad: *const torch_sys::C_tensor,
    ) -> *mut std::os::raw::c_char;
    fn free(pointer: *mut std::os::raw::c_void);
}

/// Accumulates into the leaves of `output`'s graph their gradients for `grad`, the gradient of
/// `output` (of its shape); panics with libtorch's message where autograd fails, as tch's
/// `backward` does.
pub fn backward_with_grad(output: &Tensor, grad: &Tensor) {
    #[cfg(backward_with_grad)]
    {
        // SAFETY: both pointers are live tensors for the call; the C++ side catches every
        // exception and returns its message, owned by us, or null.
        let error = unsafe { loraforge_backward_with_grad(output.as_ptr(), grad.as_ptr()) };
        if !error.is_null() {
            // SAFETY: a NUL-terminated string from strdup, freed once here.
            let message = unsafe { std::ffi::CStr::from_ptr(error) }
                .to_string_lossy()
                .into_owned();
            unsafe { free(error.cast()) };
            panic!("autograd's backward: {message}");
        }
    }
    #[cfg(not(backward_with_grad))]
    {
        let flat = |t: &Tensor| t.flatten(0, -1);
        flat(output).dot(&flat(grad)).backward();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    /// The leaves get the vector-Jacobian product for the given gradient, as autograd's own
    /// `grad(outputs, inputs, grad_outputs)` gives it; again into the same leaves, added.
    #[test]
    fn the_given_gradient_reaches_the_leaves() {
        let x = Tensor::randn([3, 4], (Kind::Double, tch::Device::Cpu)).set_requires_grad(true);
        let w = Tensor::randn([4, 5], (Kind::Double, tch::Device::Cpu));
        let y = x.mm(&w).tanh();
        let g = Tensor::randn([3, 5], (Kind::Double, tch::Device::Cpu));
        let slope = y.detach().pow_tensor_scalar(2).neg() + 1.0;
        let want = (&g * slope).mm(&w.tr());
        backward_with_grad(&y, &g);
        assert!(x.grad().allclose(&want, 1e-12, 1e-12, false));
        let y = x.mm(&w).tanh();
        backward_with_grad(&y.transpose(0, 1), &g.transpose(0, 1));
        assert!(x.grad().allclose(&(&want * 2.0), 1e-12, 1e-12, false));
        const { assert!(cfg!(backward_with_grad), "built without the C++ call") };
    }
}
