//! Where a run trains and in what precision: the job's `training.device`, unless the command
//! line (`--device`, or `LORAFORGE_DEVICE`) overrides it for this machine; the frozen base in
//! bf16 on CUDA and fp32 on the CPU (adapters are always fp32: see docs/trainer.md).

use anyhow::{bail, Result};
use loraforge_spec::DeviceChoice;
use tch::{Device, Kind};

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

/// The dtype of the frozen base: bf16 where the hardware makes it fast, fp32 on the CPU.
pub fn base_kind(device: Device) -> Kind {
    if device.is_cuda() {
        Kind::BFloat16
    } else {
        Kind::Float
    }
}

/// The device and base dtype in words, for logs and manifests: `cpu fp32`, `cuda:0 bf16`.
pub fn device_label(device: Device) -> String {
    let dtype = if base_kind(device) == Kind::BFloat16 {
        "bf16"
    } else {
        "fp32"
    };
    match device {
        Device::Cuda(index) => format!("cuda:{index} {dtype}"),
        other => format!("{} {dtype}", format!("{other:?}").to_lowercase()),
    }
}
