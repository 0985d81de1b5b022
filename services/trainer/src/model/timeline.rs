//! A training step's timeline on CUDA, when `LORAFORGE_TIMELINE_STEPS` asks (docs/trainer.md,
//! "Where a step's time goes"): what Nsight Systems would show, for a machine without it.
//!
//! Each [`mark`] records a CUDA event on libtorch's stream (the legacy default stream, as the
//! fused kernels use) and the host's clock. A segment is the work between two marks, named by
//! the mark that ends it; per name the summary gives the device's time (between the events),
//! the host's (between the clocks) and the **lead**: how far the device was behind the host
//! when the host reached the mark, that is how much queued work the device still had. A lead
//! near zero means the device had run out of work and waited for the host's launches (or a
//! synchronisation); the sum of the device's segment times against the kernels' own sum
//! (Nsight Compute, bench/gpu_ncu.sh) tells whether the kernels run slower in the step than
//! alone. Unlike [`crate::training::profile`], nothing is synchronised between marks, so the
//! step runs as it does unprofiled (one synchronisation at each step's start anchors the two
//! clocks). Off (unset, or not on CUDA), a mark costs one check of a thread-local.

use cudarc::driver::{sys::CUevent_flags, CudaContext, CudaEvent, CudaStream};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// The environment variable: a number of steps N ≥ 1 records every step after the first N
/// (warm-up); 0 or unset, off.
pub const TIMELINE_ENV: &str = "LORAFORGE_TIMELINE_STEPS";

thread_local! {
    static RECORDER: RefCell<Option<Recorder>> = const { RefCell::new(None) };
}

struct Recorder {
    stream: Arc<CudaStream>,
    warmup: u32,
    steps: u32,
    /// This step's marks, the anchor first; empty while a warm-up step runs.
    marks: Vec<Mark>,
    /// Per segment name, in the order first seen.
    segments: Vec<Segment>,
    /// Per recorded step: the device's and the host's time from anchor to last mark (ms).
    step_totals: Vec<(f64, f64)>,
}

struct Mark {
    label: &'static str,
    host: Instant,
    event: CudaEvent,
}

#[derive(Default)]
struct Segment {
    label: &'static str,
    count: u64,
    device_ms: f64,
    host_ms: f64,
    min_lead_ms: f64,
    /// Marks reached with less than [`STARVED_MS`] of work queued.
    starved: u64,
}

/// A lead below this (ms) counts as the device having run dry: a launch takes a few
/// microseconds to reach it.
const STARVED_MS: f64 = 0.05;

/// Starts a step: the marks of the step before are folded into the summary, and, after the
/// warm-up, the device is synchronised and the step's anchor recorded. Turns the recorder on
/// at the first call where the environment asks and `device` is CUDA.
pub fn begin_step(device: Device) {
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        if r.is_none() {
            *r = Recorder::from_env(device);
        }
        let Some(rec) = r.as_mut() else { return };
        rec.fold();
        rec.steps += 1;
        if rec.steps > rec.warmup {
            rec.stream
                .synchronize()
                .expect("synchronising the CUDA stream");
            rec.record("anchor");
        }
    });
}

/// Ends the segment since the last mark and names it `label`.
pub fn mark(label: &'static str) {
    RECORDER.with(|r| {
        if let Some(rec) = r.borrow_mut().as_mut().filter(|rec| !rec.marks.is_empty()) {
            rec.record(label);
        }
    });
}

/// The table, one line per segment name and one for the step, each starting `timeline`; None
/// when off or before a recorded step has ended.
pub fn summary() -> Option<Vec<String>> {
    RECORDER.with(|r| {
        let mut r = r.borrow_mut();
        let rec = r.as_mut()?;
        rec.stream.synchronize().ok()?;
        rec.fold();
        rec.summary()
    })
}

impl Recorder {
    fn from_env(device: Device) -> Option<Recorder> {
        let warmup = std::env::var(TIMELINE_ENV)
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|&n| n >= 1)?;
        let Device::Cuda(ordinal) = device else {
            tracing::warn!("{TIMELINE_ENV}: the timeline needs CUDA; not recorded");
            return None;
        };
        let ctx = match std::panic::catch_unwind(|| CudaContext::new(ordinal)) {
            Ok(Ok(ctx)) => ctx,
            _ => {
                tracing::warn!("{TIMELINE_ENV}: no CUDA driver to record events with");
                return None;
            }
        };
        Some(Recorder {
            stream: ctx.default_stream(),
            warmup,
            steps: 0,
            marks: Vec::new(),
            segments: Vec::new(),
            step_totals: Vec::new(),
        })
    }

    fn record(&mut self, label: &'static str) {
        // Timing on (cudarc's default turns it off); no blocking: the host does not wait.
        let event = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("recording a CUDA event");
        self.marks.push(Mark {
            label,
            host: Instant::now(),
            event,
        });
    }

    /// Folds the recorded step's marks into the segments (their events complete: the caller
    /// synchronised).
    fn fold(&mut self) {
        let marks = std::mem::take(&mut self.marks);
        let Some(anchor) = marks.first() else { return };
        // Each mark's time since the anchor (ms), on the device's clock and on the host's.
        let times: Vec<(f64, f64)> = marks
            .iter()
            .map(|m| {
                let device = f64::from(anchor.event.elapsed_ms(&m.event).unwrap_or(0.0));
                (device, (m.host - anchor.host).as_secs_f64() * 1e3)
            })
            .collect();
        for (i, end) in marks.iter().enumerate().skip(1) {
            let ((start_device, start_host), (end_device, end_host)) = (times[i - 1], times[i]);
            let lead = end_device - end_host;
            let k = match self.segments.iter().position(|s| s.label == end.label) {
                Some(k) => k,
                None => {
                    self.segments.push(Segment {
                        label: end.label,
                        min_lead_ms: f64::INFINITY,
                        ..Segment::default()
                    });
                    self.segments.len() - 1
                }
            };
            let s = &mut self.segments[k];
            s.count += 1;
            s.device_ms += end_device - start_device;
            s.host_ms += end_host - start_host;
            s.min_lead_ms = s.min_lead_ms.min(lead);
            s.starved += u64::from(lead < STARVED_MS);
        }
        if let Some(&last) = times.last() {
            self.step_totals.push(last);
        }
    }

    fn summary(&self) -> Option<Vec<String>> {
        let steps = self.step_totals.len();
        if steps == 0 {
            return None;
        }
        let per_step = |total: f64| total / steps as f64;
        let mut lines = vec![
            format!(
                "timeline: mean of {steps} steps after the first {}, nothing synchronised \
                 within a step; lead = work the device still had queued when the host reached \
                 the segment's end",
                self.warmup
            ),
            format!(
                "timeline: {:<20} {:>6} {:>12} {:>12} {:>12} {:>8}",
                "segment", "a step", "device ms", "host ms", "min lead ms", "starved"
            ),
        ];
        for s in &self.segments {
            lines.push(format!(
                "timeline: {:<20} {:>6} {:>12.3} {:>12.3} {:>12.3} {:>8}",
                s.label,
                s.count / steps as u64,
                per_step(s.device_ms),
                per_step(s.host_ms),
                s.min_lead_ms,
                s.starved
            ));
        }
        let device: f64 = self.step_totals.iter().map(|t| t.0).sum();
        let host: f64 = self.step_totals.iter().map(|t| t.1).sum();
        lines.push(format!(
            "timeline: {:<20} {:>6} {:>12.3} {:>12.3}",
            "step",
            1,
            per_step(device),
            per_step(host)
        ));
        Some(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_without_cuda_or_the_environment() {
        // No CUDA here (or the variable unset): marks do nothing and there is no table.
        begin_step(Device::Cpu);
        mark("anything");
        assert!(summary().is_none());
    }

    /// On a GPU: `cargo test --release -- --ignored cuda` (bench/gpu_check.sh).
    #[test]
    #[ignore = "needs a CUDA device"]
    fn the_timeline_charges_each_segment_its_kernels_on_cuda() {
        std::env::set_var(TIMELINE_ENV, "1");
        let device = Device::Cuda(0);
        let a = tch::Tensor::randn([4096, 4096], (tch::Kind::Float, device));
        for _ in 0..3 {
            begin_step(device);
            let _ = a.mm(&a);
            mark("one product");
            for _ in 0..8 {
                let _ = a.mm(&a);
            }
            mark("eight products");
            mark("nothing");
        }
        let lines = summary().expect("a table after two recorded steps");
        std::env::remove_var(TIMELINE_ENV);
        // The row of `label`: its segment column starts with it (the title line mentions
        // "nothing" too).
        let device_ms = |label: &str| -> f64 {
            let row = lines
                .iter()
                .find_map(|l| l.strip_prefix("timeline: ")?.strip_prefix(label))
                .unwrap_or_else(|| panic!("no row {label}: {lines:?}"));
            row.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        let (one, eight) = (device_ms("one product"), device_ms("eight products"));
        assert!(eight > 6.0 * one && eight < 10.0 * one, "{lines:?}");
        assert!(device_ms("nothing") < 0.1 * one, "{lines:?}");
    }
}
