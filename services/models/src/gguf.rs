//! The GGUF container (llama.cpp's model file, versions 2 and 3): a header, typed metadata,
//! tensor descriptions, then aligned tensor data. The file is memory-mapped, so opening a
//! multi-gigabyte model reads only its header; tensors are dequantized one at a time.

use crate::quant::{dequantize, GgmlType};
use crate::ModelsError;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value as the file types it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// Any integer type as i64 (files disagree on u32 vs i32 vs u64 for the same key).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(items) => Some(items),
            _ => None,
        }
    }
}

/// One tensor's description. `dims` are in ggml order: `dims[0]` varies fastest, so the
/// PyTorch shape is `dims` reversed.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: GgmlType,
    /// Byte range of the data within the file.
    start: usize,
    len: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// The shape as PyTorch and safetensors write it (rows first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile, ModelsError> {
        let io = |source| ModelsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives as long as the GgufFile. Another process
        // truncating the file while we read it would fault, as with any mapped model file
        // (llama.cpp and safetensors map theirs too); we never write through the map.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(map).map_err(|e| match e {
            ModelsError::Format(message) => {
                ModelsError::Format(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    fn parse(map: Mmap) -> Result<GgufFile, ModelsError> {
        let mut r = Reader { bytes: &map, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(ModelsError::Format(
                "not a GGUF file (no GGUF magic)".into(),
            ));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelsError::Unsupported(format!(
                "GGUF version {version} (only versions 2 and 3, little-endian, are supported)"
            )));
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i64() {
                Some(a) if a > 0 && (a as u64).is_power_of_two() => a as u64,
                _ => {
                    return Err(ModelsError::Format(format!(
                        "general.alignment {v:?} is not a power of two"
                    )))
                }
            },
        };
        let mut described = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ModelsError::Format(format!(
                    "tensor {name} has {n_dims} dimensions"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<Result<Vec<u64>, _>>()?;
            let kind = GgmlType::from_id(r.u32()?).map_err(|e| match e {
                ModelsError::Unsupported(m) => {
                    ModelsError::Unsupported(format!("tensor {name}: {m}"))
                }
                other => other,
            })?;
            let offset = r.u64()?;
            described.push((name, dims, kind, offset));
        }
        let data_start = (r.at as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(described.len());
        for (name, dims, kind, offset) in described {
            let bad = |what: &str| ModelsError::Format(format!("tensor {name} {what}"));
            let elements = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad("is too large"))?;
            let per_block = kind.block_elements() as u64;
            if dims[0] % per_block != 0 {
                return Err(bad(&format!(
                    "has rows of {} elements, not a multiple of {}'s block",
                    dims[0],
                    kind.name()
                )));
            }
            let len = elements / per_block * kind.block_bytes() as u64;
            let start = data_start
                .checked_add(offset)
                .ok_or_else(|| bad("has an offset out of range"))?;
            if offset % alignment != 0
                || start
                    .checked_add(len)
                    .is_none_or(|end| end > map.len() as u64)
            {
                return Err(bad(
                    "has data outside the file or misaligned (truncated download?)",
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                start: start as usize,
                len: len as usize,
            });
        }
        Ok(GgufFile {
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's values as f32, in row-major order of [`TensorInfo::shape`]. Cannot fail:
    /// opening the file checked that every tensor's data is whole and inside the map.
    pub fn dequantize(&self, tensor: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; tensor.elements()];
        dequantize(
            tensor.kind,
            &self.map[tensor.start..tensor.start + tensor.len],
            &mut out,
        );
        out
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// Arrays nest in principle; no real file goes deeper than one level.
const MAX_NESTING: usize = 4;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ModelsError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len());
        let end = end
            .ok_or_else(|| ModelsError::Format(format!("truncated header at byte {}", self.at)))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ModelsError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, ModelsError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ModelsError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn length(&mut self) -> Result<usize, ModelsError> {
        let n = self.u64()?;
        // A count can never exceed the bytes left: every element takes at least one byte.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.at)
            .ok_or_else(|| {
                ModelsError::Format(format!("length {n} at byte {} runs past the end", self.at))
            })
    }

    fn string(&mut self) -> Result<String, ModelsError> {
        let n = self.length()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            ModelsError::Format(format!("a string before byte {} is not UTF-8", self.at))
        })
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<MetaValue, ModelsError> {
        Ok(match kind {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 if depth < MAX_NESTING => {
                let item_kind = self.u32()?;
                let n = self.length()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_kind, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(ModelsError::Format(format!(
                    "unknown metadata type {other} at byte {}",
                    self.at
                )))
            }
        })
    }
}
