//! A test-only record of a run, for checking a method against its reference implementation
//! on exactly the same inputs (tests/python/adalora_parity.py). With `LORAFORGE_TRACE_DIR`
//! set, training writes there the adapter's variables before the first step
//! (`initial.safetensors`, after calibration where the method calibrates) and after the last
//! (`final.safetensors`), and every step's batches (`batches.safetensors`:
//! `step<N>.micro<M>.{input_ids,labels}`, and the calibration's as
//! `calibration.batch<K>.{input_ids,labels}`).

use crate::data::Batch;
use anyhow::{Context, Result};
use std::path::PathBuf;
use tch::nn::VarStore;
use tch::{Device, Tensor};

pub const TRACE_DIR_ENV: &str = "LORAFORGE_TRACE_DIR";

pub struct Trace {
    dir: PathBuf,
    batches: Vec<(String, Tensor)>,
}

impl Trace {
    /// Starts a trace when the environment asks for one, recording the initial variables.
    pub fn from_env(store: &VarStore) -> Result<Option<Trace>> {
        let Some(dir) = std::env::var_os(TRACE_DIR_ENV).map(PathBuf::from) else {
            return Ok(None);
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let trace = Trace {
            dir,
            batches: Vec::new(),
        };
        trace.write_variables("initial.safetensors", store)?;
        Ok(Some(trace))
    }

    /// Writes the variables as they are before the first step again (after calibration).
    pub fn record_initial(&self, store: &VarStore) -> Result<()> {
        self.write_variables("initial.safetensors", store)
    }

    pub fn record_calibration_batch(&mut self, index: usize, batch: &Batch) {
        for (name, t) in [("input_ids", &batch.input_ids), ("labels", &batch.labels)] {
            self.batches.push((
                format!("calibration.batch{index}.{name}"),
                t.to_device(Device::Cpu).contiguous(),
            ));
        }
    }

    pub fn record_batches(&mut self, step: u32, batches: &[Batch]) {
        for (micro, batch) in batches.iter().enumerate() {
            for (name, t) in [("input_ids", &batch.input_ids), ("labels", &batch.labels)] {
                self.batches.push((
                    format!("step{step}.micro{micro}.{name}"),
                    t.to_device(Device::Cpu).contiguous(),
                ));
            }
        }
    }

    pub fn finish(self, store: &VarStore) -> Result<()> {
        self.write_variables("final.safetensors", store)?;
        Tensor::write_safetensors(&self.batches, self.dir.join("batches.safetensors"))?;
        Ok(())
    }

    fn write_variables(&self, file: &str, store: &VarStore) -> Result<()> {
        let mut variables: Vec<(String, Tensor)> = store
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        Tensor::write_safetensors(&variables, self.dir.join(file))?;
        Ok(())
    }
}
