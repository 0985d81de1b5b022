//! Where a training step's time goes, when `LORAFORGE_PROFILE_STEPS` asks (docs/trainer.md):
//! each phase of a step timed on the host clock, the device synchronised at every phase
//! boundary on CUDA (so a phase is charged for the kernels it queued, not for the ones before
//! it), and a table of the mean per phase logged at the end of the run. Off, it reads no clock
//! and synchronises nothing.
//!
//! Synchronising takes away the overlap of the host's launches with the device's work, so a
//! profiled run is a little slower than an unprofiled one; the shares are what it is for.

use std::time::{Duration, Instant};
use tch::Device;

/// The environment variable: a number of steps N ≥ 1 turns the profile on and leaves the first
/// N steps of the run out of the means (warm-up: libtorch's lazy initialisation, the caching
/// allocator growing); 0 or unset, off.
pub const PROFILE_ENV: &str = "LORAFORGE_PROFILE_STEPS";

/// The parts of a step, in the order the table lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The step's rows read and its micro-batches built on the device.
    Data,
    /// Forward passes and the loss.
    Forward,
    /// Backward passes.
    Backward,
    /// The global gradient norm and clipping.
    Clip,
    /// Gradients cleared and the AdamW step.
    Optimizer,
    /// The method's own hooks: before the step, gradient adjustment, after the step.
    Hooks,
}

const PHASES: [Phase; 6] = [
    Phase::Data,
    Phase::Forward,
    Phase::Backward,
    Phase::Clip,
    Phase::Optimizer,
    Phase::Hooks,
];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Data => "data to device",
            Phase::Forward => "forward + loss",
            Phase::Backward => "backward",
            Phase::Clip => "grad norm + clip",
            Phase::Optimizer => "zero grad + AdamW",
            Phase::Hooks => "method hooks",
        }
    }
}

/// The step profile of a run; does nothing when off.
pub struct StepProfile(Option<Timing>);

struct Timing {
    device: Device,
    warmup: u32,
    /// Steps seen so far in this attempt.
    steps: u32,
    /// Per phase, over the warm-up steps and over the steps after them.
    warmup_totals: [Duration; PHASES.len()],
    totals: [Duration; PHASES.len()],
    since: Instant,
}

impl StepProfile {
    /// On where [`PROFILE_ENV`] names a number of warm-up steps of at least 1.
    pub fn from_env(device: Device) -> StepProfile {
        let warmup = std::env::var(PROFILE_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|&n| n >= 1);
        StepProfile(warmup.map(|warmup| Timing::new(device, warmup)))
    }

    #[cfg(test)]
    fn on(device: Device, warmup: u32) -> StepProfile {
        StepProfile(Some(Timing::new(device, warmup)))
    }

    /// Starts a step's clock.
    pub fn start_step(&mut self) {
        if let Some(t) = &mut self.0 {
            t.synchronize();
            t.steps += 1;
            t.since = Instant::now();
        }
    }

    /// Charges the time since the last mark to `phase`.
    pub fn lap(&mut self, phase: Phase) {
        crate::model::timeline::mark(phase.label());
        if let Some(t) = &mut self.0 {
            t.synchronize();
            let now = Instant::now();
            let k = PHASES.iter().position(|p| *p == phase).unwrap_or_default();
            match t.steps > t.warmup {
                true => t.totals[k] += now - t.since,
                false => t.warmup_totals[k] += now - t.since,
            }
            t.since = now;
        }
    }

    /// The table: mean milliseconds per step and share of the step for each phase, one line
    /// each, every line starting `step profile`. None when off or before any step.
    pub fn summary(&self) -> Option<Vec<String>> {
        let t = self.0.as_ref()?;
        // A run no longer than the warm-up: every step counts.
        let (skipped, totals) = match t.steps > t.warmup {
            true => (t.warmup, t.totals),
            false => (0, t.warmup_totals),
        };
        let counted = t.steps - skipped;
        if counted == 0 {
            return None;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / f64::from(counted);
        let step: f64 = totals.iter().map(|d| ms(*d)).sum();
        let share = |m: f64| 100.0 * m / step.max(f64::MIN_POSITIVE);
        let sync = match t.device {
            Device::Cuda(_) => ", the GPU synchronised at each phase boundary",
            _ => "",
        };
        let mut lines = vec![
            format!("step profile: mean of {counted} steps after the first {skipped}{sync}"),
            format!(
                "step profile: {:<18} {:>10} {:>7}",
                "phase", "ms/step", "share"
            ),
        ];
        for (phase, total) in PHASES.iter().zip(totals) {
            let m = ms(total);
            lines.push(format!(
                "step profile: {:<18} {m:>10.3} {:>6.1}%",
                phase.label(),
                share(m)
            ));
        }
        lines.push(format!(
            "step profile: {:<18} {step:>10.3} {:>6.1}%",
            "step", 100.0
        ));
        Some(lines)
    }
}

impl Timing {
    fn new(device: Device, warmup: u32) -> Timing {
        Timing {
            device,
            warmup,
            steps: 0,
            warmup_totals: [Duration::ZERO; PHASES.len()],
            totals: [Duration::ZERO; PHASES.len()],
            since: Instant::now(),
        }
    }

    fn synchronize(&self) {
        if let Device::Cuda(index) = self.device {
            tch::Cuda::synchronize(index as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(ms: u64) {
        std::thread::sleep(Duration::from_millis(ms));
    }

    /// `(ms per step, share %)` of the row whose phase starts with `label`.
    fn row(lines: &[String], label: &str) -> (f64, f64) {
        let rest = lines
            .iter()
            .find_map(|l| {
                l.strip_prefix("step profile: ")
                    .filter(|r| r.starts_with(label))
            })
            .unwrap_or_else(|| panic!("no {label} row: {lines:?}"));
        let values: Vec<&str> = rest[label.len()..].split_whitespace().collect();
        (
            values[0].parse().unwrap(),
            values[1].trim_end_matches('%').parse().unwrap(),
        )
    }

    #[test]
    fn phases_are_charged_their_own_time_after_the_warmup() {
        let mut profile = StepProfile::on(Device::Cpu, 1);
        for step in 0..3 {
            profile.start_step();
            // The warm-up step is slow and must not count.
            busy(if step == 0 { 200 } else { 2 });
            profile.lap(Phase::Data);
            busy(if step == 0 { 200 } else { 20 });
            profile.lap(Phase::Backward);
            profile.lap(Phase::Optimizer);
        }
        let lines = profile.summary().unwrap();
        assert!(
            lines[0].contains("mean of 2 steps after the first 1"),
            "{lines:?}"
        );
        let (data, data_share) = row(&lines, "data to device");
        let (backward, backward_share) = row(&lines, "backward");
        assert!((2.0..60.0).contains(&data), "{lines:?}");
        assert!((20.0..60.0).contains(&backward), "{lines:?}");
        assert!(backward_share > data_share, "{lines:?}");
        assert_eq!(row(&lines, "forward + loss"), (0.0, 0.0), "{lines:?}");
        let (optimizer, _) = row(&lines, "zero grad + AdamW");
        let (step, share) = row(&lines, "step");
        assert!(
            (step - (data + backward + optimizer)).abs() < 0.01,
            "{lines:?}"
        );
        assert_eq!(share, 100.0);
    }

    #[test]
    fn off_means_no_summary() {
        let mut profile = StepProfile(None);
        profile.start_step();
        profile.lap(Phase::Data);
        assert!(profile.summary().is_none());
        // A run shorter than the warm-up counts every step.
        let mut short = StepProfile::on(Device::Cpu, 3);
        short.start_step();
        short.lap(Phase::Forward);
        assert!(short.summary().unwrap()[0].contains("mean of 1 steps after the first 0"));
    }
}
