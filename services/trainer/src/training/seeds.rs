//! Seeds derived from a job's `training.seed`. Every random choice of a run (the validation
//! split, each epoch's order, each micro-batch's dropout) draws from its own seed, computed
//! from the job's seed and where in the run it happens. A run resumed at any step therefore
//! makes the same choices as one that never stopped, without saving generator state.

/// What a derived seed is for; each use gets unrelated streams.
#[derive(Clone, Copy)]
pub enum SeedUse {
    ValidationSplit = 1,
    EpochOrder = 2,
    Dropout = 3,
    Replay = 4,
    /// Random draws of a method's calibration (randomised SVD, random splits).
    Calibration = 5,
}

/// The seed for `purpose` at `index` (an epoch, or a step and micro-batch folded together):
/// SplitMix64's finalizer over the three, so neighbouring indices give unrelated seeds.
pub fn derive_seed(seed: u64, purpose: SeedUse, index: u64) -> u64 {
    let mut z = seed;
    for word in [purpose as u64, index] {
        z = mix(z.wrapping_add(word.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    }
    z
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// libtorch's generator is global to the process: tests whose results depend on it (dropout,
/// random weights) take turns.
#[cfg(test)]
pub fn torch_rng_turn() -> std::sync::MutexGuard<'static, ()> {
    static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_differ_by_use_index_and_job_seed() {
        let base = derive_seed(0, SeedUse::EpochOrder, 0);
        assert_eq!(base, derive_seed(0, SeedUse::EpochOrder, 0));
        assert_ne!(base, derive_seed(0, SeedUse::EpochOrder, 1));
        assert_ne!(base, derive_seed(0, SeedUse::Dropout, 0));
        assert_ne!(base, derive_seed(1, SeedUse::EpochOrder, 0));
    }
}
