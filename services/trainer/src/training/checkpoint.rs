//! Training checkpoints: all a retried attempt needs to continue exactly where an earlier one
//! stopped. That is the adapter's variables, AdamW's moments, and the loop's counters; the data
//! position is the number of rows consumed. No generator state is saved: shuffling and dropout
//! are seeded from (seed, epoch, step) alone (see `seeds`).
//!
//! In object storage, under `checkpoints/<job>/<step>/`: `adapter.safetensors`,
//! `optimizer.safetensors`, and `state.json`, written last, after the save is announced. A
//! folder without `state.json` is a save that was interrupted, and is never used.

use crate::error::user_error;
use crate::method::AdapterMethod;
use crate::training::optimizer::AdamW;
use anyhow::{anyhow, bail, Context, Result};
use chrono::{DateTime, Utc};
use loraforge_storage::layout::checkpoint_prefix;
use loraforge_storage::Store;
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};
use tokio::runtime::Runtime;
use uuid::Uuid;

const ADAPTER_FILE: &str = "adapter.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Written last: its presence says the checkpoint is complete.
const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

/// The training loop's counters after `step` optimizer steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    pub format: u32,
    pub step: u32,
    /// The run's planned length; a resumed run must plan the same, or its data changed.
    pub total_steps: u32,
    /// Training rows consumed: where the data continues.
    pub rows_consumed: u64,
    pub tokens: u64,
    pub initial_loss: Option<f64>,
    /// Sum of the losses of the steps that `final_loss` averages (the last tenth).
    pub tail_loss_sum: f64,
    /// Training time of all attempts so far.
    pub train_seconds: f64,
    /// What chat templates' `strftime_now` reports in this run (fixed at its first attempt).
    pub template_clock: DateTime<Utc>,
}

impl TrainingState {
    pub fn start(total_steps: u32, template_clock: DateTime<Utc>) -> TrainingState {
        TrainingState {
            format: FORMAT,
            step: 0,
            total_steps,
            rows_consumed: 0,
            tokens: 0,
            initial_loss: None,
            tail_loss_sum: 0.0,
            train_seconds: 0.0,
            template_clock,
        }
    }
}

pub struct Checkpoint {
    pub state: TrainingState,
    /// Every variable of the adapter method's store, by its name there (CPU, contiguous).
    pub adapter: Vec<(String, Tensor)>,
    /// The optimizer's state, as `AdamW::state` names it.
    pub optimizer: Vec<(String, Tensor)>,
}

/// A checkpoint read back, with the folder it came from.
pub struct SavedCheckpoint {
    pub prefix: String,
    pub checkpoint: Checkpoint,
}

/// Where the training loop saves checkpoints.
pub trait CheckpointStore {
    /// Saves a checkpoint. `announce` is told where, once everything but the completing write is
    /// stored; if it fails, the checkpoint is left incomplete (and so never used).
    fn save(
        &mut self,
        checkpoint: &Checkpoint,
        announce: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<()>;
}

/// The checkpoints of one job in the artifact store.
pub struct StoredCheckpoints<'a> {
    runtime: &'a Runtime,
    store: Store,
    job_id: String,
}

impl<'a> StoredCheckpoints<'a> {
    pub fn new(runtime: &'a Runtime, store: Store, job_id: Uuid) -> StoredCheckpoints<'a> {
        StoredCheckpoints {
            runtime,
            store,
            job_id: job_id.to_string(),
        }
    }

    /// `checkpoints/<job>`: the folder above every step's (`layout` knows the step's).
    fn job_prefix(&self) -> String {
        let step_prefix = checkpoint_prefix(&self.job_id, 0);
        step_prefix
            .rsplit_once('/')
            .map_or(step_prefix.clone(), |(job, _)| job.to_string())
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<SavedCheckpoint>> {
        let job_prefix = self.job_prefix();
        let listed = self.runtime.block_on(self.store.list(&job_prefix))?;
        let newest = listed
            .iter()
            .filter_map(|object| object.path.strip_suffix(&format!("/{STATE_FILE}")))
            .filter_map(|prefix| Some((prefix.rsplit_once('/')?.1.parse::<u32>().ok()?, prefix)))
            .max_by_key(|(step, _)| *step);
        let Some((_, prefix)) = newest else {
            return Ok(None);
        };
        let scratch = tempfile::tempdir().context("creating a scratch directory")?;
        let read_tensors = |name: &str| -> Result<Vec<(String, Tensor)>> {
            let path = scratch.path().join(name);
            self.runtime
                .block_on(self.store.download(&format!("{prefix}/{name}"), &path))?;
            Tensor::read_safetensors(&path)
                .with_context(|| format!("reading checkpoint file {prefix}/{name}"))
        };
        let state_bytes = self
            .runtime
            .block_on(self.store.get(&format!("{prefix}/{STATE_FILE}")))?;
        let state: TrainingState = serde_json::from_slice(&state_bytes)
            .with_context(|| format!("checkpoint {prefix}/{STATE_FILE} is not a training state"))?;
        if state.format != FORMAT {
            bail!(
                "checkpoint {prefix} has format {}; this trainer reads format {FORMAT}",
                state.format
            );
        }
        let checkpoint = Checkpoint {
            state,
            adapter: read_tensors(ADAPTER_FILE)?,
            optimizer: read_tensors(OPTIMIZER_FILE)?,
        };
        Ok(Some(SavedCheckpoint {
            prefix: prefix.to_string(),
            checkpoint,
        }))
    }

    /// Removes the job's checkpoints (once its adapter is published they are of no use).
    pub fn delete_all(&self) -> Result<usize> {
        Ok(self
            .runtime
            .block_on(self.store.delete_prefix(&self.job_prefix()))?)
    }
}

impl CheckpointStore for StoredCheckpoints<'_> {
    fn save(
        &mut self,
        checkpoint: &Checkpoint,
        announce: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        let prefix = checkpoint_prefix(&self.job_id, checkpoint.state.step);
        let scratch = tempfile::tempdir().context("creating a scratch directory")?;
        for (name, tensors) in [
            (ADAPTER_FILE, &checkpoint.adapter),
            (OPTIMIZER_FILE, &checkpoint.optimizer),
        ] {
            let path = scratch.path().join(name);
            Tensor::write_safetensors(tensors, &path).with_context(|| format!("writing {name}"))?;
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            self.runtime
                .block_on(self.store.put(&format!("{prefix}/{name}"), bytes.into()))?;
        }
        announce(&prefix)?;
        let state = serde_json::to_vec_pretty(&checkpoint.state)?;
        self.runtime.block_on(
            self.store
                .put(&format!("{prefix}/{STATE_FILE}"), state.into()),
        )?;
        Ok(())
    }
}

/// A checkpoint of the run as it is after `state.step` steps.
pub fn checkpoint_of(
    method: &dyn AdapterMethod,
    optimizer: &AdamW,
    state: &TrainingState,
) -> Checkpoint {
    let mut adapter: Vec<(String, Tensor)> = method
        .var_store()
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    adapter.sort_by(|a, b| a.0.cmp(&b.0));
    Checkpoint {
        state: state.clone(),
        adapter,
        optimizer: optimizer.state(),
    }
}

/// Puts a checkpoint's adapter and optimizer state back. A checkpoint planned for another run
/// length means the data changed since it was written (a `file://` input edited in place).
pub fn restore(
    method: &dyn AdapterMethod,
    optimizer: &mut AdamW,
    checkpoint: &Checkpoint,
    total_steps: u32,
) -> Result<()> {
    let state = &checkpoint.state;
    if state.total_steps != total_steps {
        return Err(user_error(format!(
            "the checkpoint at step {} belongs to a run of {} steps, but this run has {total_steps}: \
             the training data changed since it was written",
            state.step, state.total_steps
        )));
    }
    let mut variables = method.var_store().variables();
    if checkpoint.adapter.len() != variables.len() {
        bail!(
            "the checkpoint holds {} adapter variables; the adapter has {}",
            checkpoint.adapter.len(),
            variables.len()
        );
    }
    for (name, saved) in &checkpoint.adapter {
        let variable = variables
            .get_mut(name)
            .ok_or_else(|| anyhow!("the adapter has no variable {name}"))?;
        if variable.size() != saved.size() {
            bail!(
                "checkpoint variable {name} has shape {:?}; the adapter's is {:?}",
                saved.size(),
                variable.size()
            );
        }
        tch::no_grad(|| variable.copy_(saved));
    }
    optimizer.load_state(&checkpoint.optimizer, u64::from(state.step))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_complete_checkpoint_is_read_back() {
        let runtime = Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(&format!("file://{}", dir.path().display())).unwrap();
        let mut checkpoints = StoredCheckpoints::new(&runtime, store.clone(), Uuid::nil());
        assert!(checkpoints.latest().unwrap().is_none());
        for step in [5, 10] {
            let mut state = TrainingState::start(20, Utc::now());
            state.step = step;
            let tensor = Tensor::from_slice(&[step as f32, 1.0]);
            let checkpoint = Checkpoint {
                state,
                adapter: vec![("layer.lora_A".into(), tensor.shallow_clone())],
                optimizer: vec![("exp_avg.layer.lora_A".into(), tensor * 2.0)],
            };
            let mut announced = None;
            let mut announce = |prefix: &str| {
                announced = Some(prefix.to_string());
                Ok(())
            };
            checkpoints.save(&checkpoint, &mut announce).unwrap();
            assert_eq!(
                announced,
                Some(checkpoint_prefix(&Uuid::nil().to_string(), step))
            );
        }
        // A save whose announcement fails is left incomplete.
        let mut state = TrainingState::start(20, Utc::now());
        state.step = 20;
        let refused = Checkpoint {
            state,
            adapter: Vec::new(),
            optimizer: Vec::new(),
        };
        let err = checkpoints
            .save(&refused, &mut |_| Err(anyhow::anyhow!("lease lost")))
            .unwrap_err();
        assert_eq!(err.to_string(), "lease lost");
        // A save interrupted before its state file: never used.
        let interrupted = checkpoint_prefix(&Uuid::nil().to_string(), 15);
        runtime
            .block_on(store.put(
                &format!("{interrupted}/{ADAPTER_FILE}"),
                b"partial".to_vec().into(),
            ))
            .unwrap();

        let saved = checkpoints.latest().unwrap().expect("a checkpoint");
        assert_eq!(
            (saved.checkpoint.state.step, saved.prefix.as_str()),
            (10, checkpoint_prefix(&Uuid::nil().to_string(), 10).as_str())
        );
        assert_eq!(saved.checkpoint.adapter[0].0, "layer.lora_A");
        assert_eq!(
            Vec::<f32>::try_from(&saved.checkpoint.optimizer[0].1).unwrap(),
            [20.0, 2.0]
        );
        assert_eq!(checkpoints.delete_all().unwrap(), 9);
        assert!(checkpoints.latest().unwrap().is_none());
    }
}
