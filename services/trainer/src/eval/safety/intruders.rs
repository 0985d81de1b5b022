//! Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
//! Equivalence", arXiv 2410.21228): singular vectors of a fine-tuned matrix that resemble none of
//! the base matrix's. LoRA tends to create them where full fine-tuning does not, and they go
//! with forgetting, so a count that jumps is a weight-space signal that the adapter did more
//! than the data asked, visible without running the model.

use crate::export::PeftAdapter;
use crate::families::updates;
use crate::model::weights::{read_safetensors, weight_files};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The top singular vectors of the tuned matrix that are examined (the paper's and PEFT's default).
pub const TOP_K: i64 = 10;
/// A tuned singular vector is an intruder when its largest |cosine| with every base left
/// singular vector stays below this (the paper's default).
pub const EPSILON: f64 = 0.5;

/// Intruder dimensions of every module the adapter changes, by module path. Base weights are
/// read file by file, keeping only the adapted ones, so a large model is never in memory twice;
/// the SVDs run on `device` in fp32.
pub fn count_intruders(
    model_dir: &Path,
    adapter: &PeftAdapter,
    device: Device,
) -> Result<BTreeMap<String, u32>> {
    let updates = updates(adapter)?;
    let mut counts = BTreeMap::new();
    for file in weight_files(model_dir)? {
        let mut adapted = Vec::new();
        read_safetensors(&file, |name, tensor| {
            if let Some(module) = name
                .strip_suffix(".weight")
                .filter(|m| updates.contains_key(*m))
            {
                adapted.push((module.to_string(), tensor));
            }
        })?;
        for (module, w0) in adapted {
            let w0 = w0.to_device(device).to_kind(Kind::Float);
            let tuned = &w0 + updates[&module].delta(&module, &w0)?;
            counts.insert(module, intruders(&w0, &tuned, TOP_K, EPSILON)?);
        }
    }
    Ok(counts)
}

/// How many of the top-`k` left singular vectors of `tuned` have max |cos| < `epsilon` with
/// all left singular vectors of `base` (both `(out, in)`, as Hugging Face stores weights).
pub fn intruders(base: &Tensor, tuned: &Tensor, k: i64, epsilon: f64) -> Result<u32> {
    let (u0, _, _) = base.f_svd(true, true)?;
    let (ut, _, _) = tuned.f_svd(true, true)?;
    let k = k.min(ut.size()[1]);
    // sim[j, i] = |<ut_j, u0_i>|; singular values come sorted, largest first.
    let similarity = ut.narrow(1, 0, k).tr().matmul(&u0).abs();
    let best = similarity.amax([1], false);
    Ok(u32::try_from(
        best.lt(epsilon).sum(Kind::Int64).int64_value(&[]),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_dominant_direction_is_an_intruder_and_small_updates_are_not() {
        let _turn = crate::training::seeds::torch_rng_turn();
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (out, inp) = (64, 96);
        let base = Tensor::randn([out, inp], opts);
        assert_eq!(intruders(&base, &base, TOP_K, EPSILON).unwrap(), 0);
        let nudged = &base + Tensor::randn([out, inp], opts) * 1e-3;
        assert_eq!(intruders(&base, &nudged, TOP_K, EPSILON).unwrap(), 0);
        // A direction spread evenly over all base singular vectors: |cos| = 1/8 with each.
        let (u0, _, _) = base.svd(true, true);
        let direction =
            u0.sum_dim_intlist([1i64].as_slice(), false, Kind::Float) / (out as f64).sqrt();
        let v = Tensor::randn([inp], opts);
        let v = &v / v.norm();
        let tuned = &base + direction.outer(&v) * 1000.0;
        assert_eq!(intruders(&base, &tuned, TOP_K, EPSILON).unwrap(), 1);
    }
}
