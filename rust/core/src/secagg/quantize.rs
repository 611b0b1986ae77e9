//! Stochastic quantization into the ring Z_2^32 that masks live in.
//!
//! A value is clipped to [-clip, clip], mapped to [0, 2^bits - 1] and rounded up or down at
//! random with the probability that makes the expected result exact (unbiased). A sum of m
//! learners' values fits the ring while m (2^bits - 1) < 2^32: the settings check that bound
//! for the federation's size.

/// Quantize `values`; `uniform` gives uniform floats in [0, 1) (the learner's CSPRNG).
pub fn quantize(
    values: &[f32],
    clip: f32,
    bits: u32,
    mut uniform: impl FnMut() -> f64,
) -> Vec<u32> {
    let levels = ((1u64 << bits) - 1) as f64;
    let (clip, span) = (clip as f64, 2.0 * clip as f64);
    values
        .iter()
        .map(|&v| {
            let scaled = ((v as f64).clamp(-clip, clip) + clip) / span * levels;
            let floor = scaled.floor();
            let up = (uniform() < scaled - floor) as u32 as f64;
            (floor + up).min(levels) as u32
        })
        .collect()
}

/// The mean of `count` learners' values from the sum of their quantized values.
pub fn mean_of_sum(sum: &[u32], count: u32, clip: f32, bits: u32) -> Vec<f32> {
    let levels = ((1u64 << bits) - 1) as f64;
    let (clip, count) = (clip as f64, count as f64);
    sum.iter()
        .map(|&s| ((s as f64 / count) / levels * 2.0 * clip - clip) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_is_unbiased_and_within_one_step() {
        let mut state = 1u64;
        let mut uniform = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let value = [0.123_456f32; 20_000];

        let q = quantize(&value, 1.0, 8, &mut uniform);
        let mean = mean_of_sum(
            &[q.iter().map(|&x| x as u64).sum::<u64>() as u32],
            20_000,
            1.0,
            8,
        );

        let step = 2.0 / 255.0;
        assert!(q
            .iter()
            .all(|&x| (x as f32 * step - 1.0 - 0.123_456).abs() <= step));
        assert!((mean[0] - 0.123_456).abs() < step / 20.0, "{}", mean[0]);
    }

    #[test]
    fn values_beyond_the_clip_land_on_the_ends() {
        assert_eq!(quantize(&[-9.0, 9.0], 1.0, 4, || 0.5), vec![0, 15]);
    }
}
