//! Where a run trains: the job's `training.device`, unless the command line (`--device`, or
//! `LORAFORGE_DEVICE`) overrides it for this machine.

use crate::model::device_label;
use anyhow::{bail, Result};
use loraforge_spec::DeviceChoice;
use tch::Device;

/// The device for a choice; `auto` is CUDA when there is one. Asking for CUDA where there is
/// none fails as a system error: the job may well run on another machine.
pub fn resolve_device(choice: DeviceChoice) -> Result<Device> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto => Device::cuda_if_available(),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
        DeviceChoice::Cuda => bail!("device cuda was asked for, but no CUDA device is available"),
    };
    tracing::info!(device = device_label(device), "device chosen");
    Ok(device)
}
