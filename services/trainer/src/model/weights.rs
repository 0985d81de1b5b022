//! Reading `*.safetensors` weights (one file or a sharded index) one tensor at a time,
//! so loading a model needs host memory for its largest tensor, not for a whole file.

use crate::error::user_error;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const SINGLE_FILE: &str = "model.safetensors";
const SHARD_INDEX: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [u64; 2],
}

/// Every tensor of a model directory, converted to `kind` on `device`.
pub fn load_model_weights(
    model_dir: &Path,
    device: Device,
    kind: Kind,
) -> Result<HashMap<String, Tensor>> {
    let mut weights = HashMap::new();
    for file in weight_files(model_dir)? {
        read_safetensors(&file, |name, tensor| {
            weights.insert(name, tensor.to_device(device).to_kind(kind));
        })?;
    }
    Ok(weights)
}

/// The safetensors files holding a model directory's weights: the single file, or the shards
/// its index names.
pub fn weight_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(if model_dir.join(SINGLE_FILE).is_file() {
        vec![model_dir.join(SINGLE_FILE)]
    } else if model_dir.join(SHARD_INDEX).is_file() {
        let index_path = model_dir.join(SHARD_INDEX);
        let bytes = std::fs::read(&index_path)
            .with_context(|| format!("reading {}", index_path.display()))?;
        let index: ShardIndex = serde_json::from_slice(&bytes).map_err(|e| {
            user_error(format!(
                "{} is not a safetensors index: {e}",
                index_path.display()
            ))
        })?;
        let shards: BTreeSet<String> = index.weight_map.into_values().collect();
        shards
            .into_iter()
            .map(|name| model_dir.join(name))
            .collect()
    } else {
        return Err(user_error(format!(
            "{} has neither {SINGLE_FILE} nor {SHARD_INDEX} (only safetensors weights are supported)",
            model_dir.display()
        )));
    })
}

/// Calls `each` with every tensor of one safetensors file, in file order, on the CPU in its stored dtype.
pub fn read_safetensors(path: &Path, mut each: impl FnMut(String, Tensor)) -> Result<()> {
    let bad = |what: String| user_error(format!("{}: {what}", path.display()));
    let mut file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
    let file_len = file.metadata()?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| bad("not a safetensors file".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > file_len.saturating_sub(8) {
        return Err(bad(
            "not a safetensors file (header length out of range)".into()
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("malformed safetensors header: {e}")))?;
    entries.remove("__metadata__");
    let mut tensors: Vec<(String, TensorEntry)> = entries
        .into_iter()
        .map(|(name, v)| {
            let entry =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            Ok((name, entry))
        })
        .collect::<Result<_>>()?;
    tensors.sort_by_key(|(_, t)| t.data_offsets[0]);
    let data_start = 8 + header_len;
    for (name, entry) in tensors {
        let kind = match entry.dtype.as_str() {
            "F32" => Kind::Float,
            "F16" => Kind::Half,
            "BF16" => Kind::BFloat16,
            "F64" => Kind::Double,
            // Integer tensors are positions, not weights (SHiRA's `shira_indices`).
            "I32" => Kind::Int,
            "I64" => Kind::Int64,
            other => {
                return Err(bad(format!(
                    "tensor {name} has dtype {other}; only F32, F16, BF16, F64, I32 and I64 are supported"
                )))
            }
        };
        let [begin, end] = entry.data_offsets;
        let numel: i64 = entry.shape.iter().product();
        let expected = numel as u64 * kind.elt_size_in_bytes() as u64;
        if end < begin || end - begin != expected || data_start + end > file_len {
            return Err(bad(format!(
                "tensor {name}: data offsets do not match its shape {:?}",
                entry.shape
            )));
        }
        let mut data = vec![0u8; expected as usize];
        file.seek(SeekFrom::Start(data_start + begin))?;
        file.read_exact(&mut data)?;
        each(name, Tensor::f_from_data_size(&data, &entry.shape, kind)?);
    }
    Ok(())
}
