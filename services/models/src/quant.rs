//! ggml's tensor encodings and their dequantization to f32, block by block, computed in the
//! same order of operations as ggml's reference code (`dequantize_row_*` in ggml-quants.c),
//! so the values equal those of llama.cpp and of gguf-py, which transformers uses.

use crate::ModelsError;
use half::f16;

/// Elements per block of the k-quants ("super-blocks").
const QK_K: usize = 256;

/// The ggml types we can dequantize (`enum ggml_type`; the numbers are the file's type ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type with file id `id`; ids of types we cannot read are named in the error.
    pub fn from_id(id: u32) -> Result<GgmlType, ModelsError> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => {
                let name = match other {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16..=23 | 29 => "an IQ quantization",
                    24..=28 => "an integer or f64 type",
                    34 | 35 => "a ternary quantization (TQ1_0/TQ2_0)",
                    _ => "an unknown type",
                };
                return Err(ModelsError::Unsupported(format!(
                    "ggml type {other} ({name}); supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Elements per block; a row's length must be a multiple of it.
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block (`GGML_QUANT_SIZES`).
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q2K => QK_K / 16 + QK_K / 4 + 2 + 2,
            GgmlType::Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            GgmlType::Q4K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
        }
    }
}

/// Dequantizes `data` (whole blocks of `kind`) into `out`. The caller sizes both: `out` holds
/// exactly the elements the blocks encode ([`crate::gguf::GgufFile`] checks this when it
/// reads a tensor's description), and any excess on either side is left alone.
pub(crate) fn dequantize(kind: GgmlType, data: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = (kind.block_elements(), kind.block_bytes());
    debug_assert_eq!(data.len() / block_bytes * per_block, out.len());
    let blocks = data
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(per_block));
    match kind {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = half(b, 0)),
        GgmlType::BF16 => blocks.for_each(|(b, y)| {
            y[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| q8_0(b, y)),
        GgmlType::Q2K => blocks.for_each(|(b, y)| q2_k(b, y)),
        GgmlType::Q3K => blocks.for_each(|(b, y)| q3_k(b, y)),
        GgmlType::Q4K => blocks.for_each(|(b, y)| q4_k(b, y)),
        GgmlType::Q5K => blocks.for_each(|(b, y)| q5_k(b, y)),
        GgmlType::Q6K => blocks.for_each(|(b, y)| q6_k(b, y)),
    }
}

/// The little-endian f16 at `at`, widened.
fn half(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The 4-bit value for element `i` of a 32-element block: low nibbles hold 0..16, high 16..32.
fn nibble(qs: &[u8], i: usize) -> u8 {
    if i < 16 {
        qs[i] & 0x0F
    } else {
        qs[i - 16] >> 4
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (i, v) in y.iter_mut().enumerate() {
        *v = (i32::from(nibble(&b[2..], i)) - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    for (i, v) in y.iter_mut().enumerate() {
        *v = f32::from(nibble(&b[4..], i)) * d + m;
    }
}

/// The 5-bit value of element `i`: a nibble plus bit `i` of the 32-bit `qh` as bit 4.
fn five_bits(qh: u32, qs: &[u8], i: usize) -> u8 {
    nibble(qs, i) | ((((qh >> i) & 1) as u8) << 4)
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (i, v) in y.iter_mut().enumerate() {
        *v = (i32::from(five_bits(qh, &b[6..], i)) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (half(b, 0), half(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (i, v) in y.iter_mut().enumerate() {
        *v = f32::from(five_bits(qh, &b[8..], i)) * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = half(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..]) {
        *v = f32::from(q as i8) * d;
    }
}

/// Q2_K: 16 groups of 16, each with a 4-bit scale and a 4-bit min; 2-bit values.
/// Layout: scales[16], qs[64], d, dmin.
fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (half(b, 80), half(b, 82));
    for (e, v) in y.iter_mut().enumerate() {
        let sc = scales[e / 16];
        let (dl, ml) = (d * f32::from(sc & 0x0F), dmin * f32::from(sc >> 4));
        let q = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        *v = dl * f32::from(q) - ml;
    }
}

/// Q3_K: 16 groups of 16 with signed 6-bit scales; 2-bit values plus a high bit that, when
/// clear, subtracts 4. Layout: hmask[32], qs[64], scales[12], d.
fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = half(b, 108);
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        let low = if i < 8 {
            packed[i] & 0x0F
        } else {
            packed[i - 8] >> 4
        };
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = f32::from(((low | (high << 4)) as i8) - 32);
    }
    for (e, v) in y.iter_mut().enumerate() {
        let low = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
        let high_set = (hmask[e % 32] >> (e / 32)) & 1 == 1;
        let q = low as i8 - if high_set { 0 } else { 4 };
        *v = d * scales[e / 16] * f32::from(q);
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 4-bit value of element `e` of a 256-element block whose nibbles come in runs of 32:
/// 32 low nibbles, then the same 32 bytes' high nibbles.
fn k_nibble(qs: &[u8], e: usize) -> u8 {
    (qs[(e / 64) * 32 + e % 32] >> (4 * ((e % 64) / 32))) & 0x0F
}

/// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins; 4-bit values.
/// Layout: d, dmin, scales[12], qs[128].
fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, scales, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..144]);
    for (sub, chunk) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(sub, scales);
        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
        for (l, v) in chunk.iter_mut().enumerate() {
            *v = d1 * f32::from(k_nibble(qs, sub * 32 + l)) - m1;
        }
    }
}

/// Q5_K: Q4_K plus a fifth bit per value. Layout: d, dmin, scales[12], qh[32], qs[128].
fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin, scales, qh, qs) = (half(b, 0), half(b, 2), &b[4..16], &b[16..48], &b[48..176]);
    for (sub, chunk) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(sub, scales);
        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
        for (l, v) in chunk.iter_mut().enumerate() {
            let high = ((qh[l] >> sub) & 1) << 4;
            *v = d1 * f32::from(k_nibble(qs, sub * 32 + l) | high) - m1;
        }
    }
}

/// Q6_K: 16 groups of 16 with signed 8-bit scales; 6-bit values centred on 32.
/// Layout: ql[128], qh[64], scales[16], d.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half(b, 208);
    for (e, v) in y.iter_mut().enumerate() {
        // Each half of 128 values uses 64 bytes of ql and 32 of qh, in four runs of 32.
        let (half_index, within) = (e / 128, e % 128);
        let (run, l) = (within / 32, within % 32);
        let low = (ql[half_index * 64 + (run % 2) * 32 + l] >> (4 * (run / 2))) & 0x0F;
        let high = (qh[half_index * 32 + l] >> (2 * run)) & 3;
        let q = ((low | (high << 4)) as i8) - 32;
        *v = d * f32::from(scales[e / 16] as i8) * f32::from(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_bits().to_le_bytes()
    }

    #[test]
    fn q8_0_and_q4_1_follow_the_reference_formulas() {
        let mut block = f16_bytes(0.5).to_vec();
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);

        let mut block = [f16_bytes(0.25), f16_bytes(-1.0)].concat();
        block.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
        dequantize(GgmlType::Q4_1, &block, &mut out);
        // Element 3 is the low nibble of byte 3 (3); element 19 the high nibble of byte 3 (12).
        assert_eq!((out[3], out[19]), (3.0 * 0.25 - 1.0, 12.0 * 0.25 - 1.0));
    }

    #[test]
    fn q5_0_takes_bit_four_from_qh() {
        let mut block = f16_bytes(1.0).to_vec();
        block.extend(0x8000_0001u32.to_le_bytes());
        block.extend([0u8; 16]);
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q5_0, &block, &mut out);
        assert_eq!((out[0], out[1], out[31]), (0.0, -16.0, 0.0));
    }

    #[test]
    fn unsupported_types_are_named() {
        assert!(GgmlType::from_id(16)
            .unwrap_err()
            .to_string()
            .contains("IQ"));
        assert_eq!(GgmlType::from_id(14).unwrap(), GgmlType::Q6K);
    }
}
