//! Element types the kernels store: f32 and bf16. Arithmetic is always f32; bf16 is storage
//! only, rounded to nearest even on the way out (on the device as on the host, by `half`).

use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
use half::bf16;
use serde::Serialize;

/// The storage type of a buffer, as a value (kernel names end in its [`DType::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// bfloat16: f32's exponent, 8 bits of mantissa.
    Bf16,
}

impl DType {
    /// Both types, f32 first.
    pub const ALL: [DType; 2] = [DType::F32, DType::Bf16];

    /// The suffix of kernel names: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type the kernels take: [`f32`] or [`half::bf16`].
pub trait Dtype: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const KIND: DType;
    /// Converts (rounding to nearest even for bf16).
    fn from_f32(v: f32) -> Self;
    /// Widens to f32 (exact for both types).
    fn to_f32(self) -> f32;
}

impl Dtype for f32 {
    const KIND: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Dtype for bf16 {
    const KIND: DType = DType::Bf16;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// Converts a slice of f32 to `T` (rounding for bf16).
pub fn from_f32_slice<T: Dtype>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Widens a slice of `T` to f32.
pub fn to_f32_vec<T: Dtype>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

/// Rounds every value to what `T` can hold, in place (a no-op for f32): the cpu reference
/// then sees exactly the inputs the device sees.
pub fn round_to<T: Dtype>(v: &mut [f32]) {
    if T::KIND != DType::F32 {
        for x in v.iter_mut() {
            *x = T::from_f32(*x).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_nan() {
        // 1 + 2^-8 sits halfway between two bf16 values: ties go to the even mantissa (1.0).
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        assert_eq!(bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 4.0 / 256.0);
        assert!(bf16::from_f32(f32::NAN).to_f32().is_nan());
        let mut v = vec![1.0 + 1.0 / 256.0, 3.0];
        round_to::<bf16>(&mut v);
        assert_eq!(v, vec![1.0, 3.0]);
    }

    #[test]
    fn names_are_kernel_suffixes() {
        assert_eq!(DType::F32.name(), "f32");
        assert_eq!(DType::Bf16.name(), "bf16");
        assert_eq!(<bf16 as Dtype>::KIND.size_bytes(), 2);
    }
}
