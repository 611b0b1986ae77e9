//! One SecAgg+ round (Bell et al. 2020): the learner's state through its four messages, and the
//! server's unmasking. Messages are plain values; the federation core carries them.
//!
//! 1. advertise: each learner sends two X25519 public keys (share encryption, masking);
//! 2. share: it Shamir-splits its masking secret and a fresh self-mask seed among its k
//!    neighbours (threshold t) and seals each pair of shares to its neighbour;
//! 3. input: it sends y = q(x) + PRG(b) + sum over neighbours j of +-PRG(s_ij) (mod 2^32),
//!    + when its index is below j's: every pairwise mask appears once with each sign;
//! 4. unmask: told who sent inputs (survivors) and who did not (dropped), it opens the shares
//!    its neighbours sealed to it and returns, for each neighbour, the self-mask share of a
//!    survivor or the masking-secret share of a dropped one, never both.
//!
//! The server sums the inputs, removes each survivor's self mask (from t shares of b) and each
//! dropped learner's pairwise masks with its surviving neighbours (from t shares of its secret).
//! It learns the sum of the survivors' quantized values and nothing about any one of them as
//! long as fewer than t of a learner's neighbours collude with it.

use std::collections::{BTreeMap, BTreeSet};

use x25519_dalek::StaticSecret;

use rayon::prelude::*;

use super::crypto::{
    agree, apply_masks, open, public_of, seal, secret_from, MASK_LABEL, SHARE_LABEL,
};
use super::field::{combine, split, SHARE_BYTES};
use super::quantize::quantize;
use super::SecAggError;

/// One round's public settings (every learner and the server hold the same).
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSettings {
    /// Round identifier, mixed into every derived key (a fresh one per round).
    pub round: Vec<u8>,
    /// Learners that advertised keys, indexed 0..learners.
    pub learners: u32,
    /// Neighbours of each learner (even, 2..learners - 1; all others when learners - 1).
    pub neighbours: u32,
    /// Shares of a neighbour's secrets needed to rebuild them (more than half the neighbours).
    pub threshold: u32,
    /// Values are clipped to [-clip, clip].
    pub clip: f32,
    /// Quantization bits; learners x (2^bits - 1) must stay below 2^32.
    pub bits: u32,
}

impl RoundSettings {
    /// Refuse settings that cannot work or would leak: threshold at most half the neighbours
    /// (two disjoint sets could each rebuild a learner's secrets), a sum that could wrap.
    pub fn check(&self) -> Result<(), SecAggError> {
        let fail = |m: String| Err(SecAggError::Settings(m));
        let (n, k, t) = (self.learners, self.neighbours, self.threshold);
        if n < 3 || k < 2 || k >= n || (k % 2 == 1 && k != n - 1) {
            return fail(format!(
                "{n} learners with {k} neighbours each (need 3+ learners, an even number of \
                 neighbours below the learners, or all others)"
            ));
        }
        if 2 * t <= k || t > k {
            return fail(format!(
                "threshold {t} for {k} neighbours: it must be more than half of them and at most all"
            ));
        }
        if !(1..=31).contains(&self.bits) || (n as u64) * ((1u64 << self.bits) - 1) >= 1 << 32 {
            return fail(format!(
                "{} quantization bits for {n} learners: the sum could wrap 2^32",
                self.bits
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return fail(format!("clip must be finite and > 0, got {}", self.clip));
        }
        Ok(())
    }

    /// The neighbours of learner `i`: i +- 1 .. k/2 around the ring of indices (the server
    /// assigns indices at random, so the graph is a random k-regular one).
    pub fn neighbours_of(&self, i: u32) -> Vec<u32> {
        let n = self.learners;
        if self.neighbours == n - 1 {
            return (0..n).filter(|&j| j != i).collect();
        }
        let mut out: BTreeSet<u32> = BTreeSet::new();
        for d in 1..=self.neighbours / 2 {
            out.insert((i + d) % n);
            out.insert((i + n - d) % n);
        }
        out.into_iter().collect()
    }
}

/// A learner's two advertised public keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdvertisedKeys {
    /// Key agreement for sealing shares.
    pub sealing: [u8; 32],
    /// Key agreement for pairwise masks.
    pub masking: [u8; 32],
}

/// A learner's state through one round.
pub struct SecAggLearner {
    settings: RoundSettings,
    index: u32,
    sealing: StaticSecret,
    masking: StaticSecret,
    self_seed: [u8; 32],
    keys: BTreeMap<u32, AdvertisedKeys>,
    held: BTreeMap<u32, Vec<u8>>, // sealed shares from each neighbour
    answered: bool,
}

impl SecAggLearner {
    /// Learner `index` of a round; `random32` draws from the learner's CSPRNG.
    pub fn new(
        settings: RoundSettings,
        index: u32,
        mut random32: impl FnMut() -> [u8; 32],
    ) -> Result<Self, SecAggError> {
        settings.check()?;
        if index >= settings.learners {
            return Err(SecAggError::Settings(format!(
                "index {index} of {} learners",
                settings.learners
            )));
        }
        Ok(Self {
            settings,
            index,
            sealing: secret_from(random32()),
            masking: secret_from(random32()),
            self_seed: random32(),
            keys: BTreeMap::new(),
            held: BTreeMap::new(),
            answered: false,
        })
    }

    /// Step 1: the public keys to advertise.
    pub fn advertise(&self) -> AdvertisedKeys {
        AdvertisedKeys {
            sealing: public_of(&self.sealing),
            masking: public_of(&self.masking),
        }
    }

    /// Step 2: given every neighbour's keys, the sealed shares for each neighbour.
    pub fn share(
        &mut self,
        keys: &BTreeMap<u32, AdvertisedKeys>,
        random: impl FnMut() -> u64,
    ) -> Result<Vec<(u32, Vec<u8>)>, SecAggError> {
        let neighbours = self.settings.neighbours_of(self.index);
        for j in &neighbours {
            let key = keys.get(j).ok_or(SecAggError::MissingKeys(*j))?;
            self.keys.insert(*j, *key);
        }
        let (t, k) = (self.settings.threshold as usize, neighbours.len());
        let mut random = random;
        let secret_shares = split(&self.masking.to_bytes(), t, k, &mut random)?;
        let seed_shares = split(&self.self_seed, t, k, &mut random)?;
        Ok(neighbours
            .iter()
            .enumerate()
            .map(|(position, &j)| {
                let mut plain = Vec::with_capacity(2 * SHARE_BYTES);
                plain.extend_from_slice(&secret_shares[position]);
                plain.extend_from_slice(&seed_shares[position]);
                let key = agree(
                    &self.sealing,
                    &self.keys[&j].sealing,
                    SHARE_LABEL,
                    &self.settings.round,
                );
                (j, seal(&key, self.index, j, &plain))
            })
            .collect())
    }

    /// Keep the shares neighbour `from` sealed to this learner (step 2's delivery).
    pub fn receive(&mut self, from: u32, sealed: Vec<u8>) -> Result<(), SecAggError> {
        if !self.settings.neighbours_of(self.index).contains(&from) {
            return Err(SecAggError::Malformed(format!(
                "shares from {from}, not a neighbour"
            )));
        }
        self.held.insert(from, sealed);
        Ok(())
    }

    /// Step 3: the masked, quantized input; `uniform` gives floats in [0, 1) for rounding.
    pub fn masked_input(
        &self,
        values: &[f32],
        uniform: impl FnMut() -> f64,
    ) -> Result<Vec<u32>, SecAggError> {
        let mut y = quantize(values, self.settings.clip, self.settings.bits, uniform);
        let mut seeds = vec![(self.self_seed, 1i8)];
        // Only neighbours whose shares arrived: the server delivers shares among the learners
        // that all completed step 2, so a pair masks with each other exactly when both did.
        for &j in self.held.keys() {
            let key = self.keys.get(&j).ok_or(SecAggError::MissingKeys(j))?;
            let seed = agree(
                &self.masking,
                &key.masking,
                MASK_LABEL,
                &self.settings.round,
            );
            seeds.push((seed, if self.index < j { 1 } else { -1 }));
        }
        apply_masks(&mut y, &seeds);
        Ok(y)
    }

    /// Step 4: for each neighbour that sealed shares to this learner, its self-mask share if it
    /// is a survivor, its masking-secret share if it dropped. Answered once per round.
    pub fn unmask(
        &mut self,
        survivors: &BTreeSet<u32>,
        dropped: &BTreeSet<u32>,
    ) -> Result<Vec<(u32, [u8; SHARE_BYTES])>, SecAggError> {
        if self.answered {
            return Err(SecAggError::Malformed(
                "a second unmask request in one round".into(),
            ));
        }
        if survivors.intersection(dropped).next().is_some() || !survivors.contains(&self.index) {
            return Err(SecAggError::Malformed(
                "a learner both survived and dropped, or this learner is not a survivor".into(),
            ));
        }
        self.answered = true;
        let mut out = Vec::new();
        for (&j, sealed) in &self.held {
            let half = if survivors.contains(&j) {
                SHARE_BYTES // the self-mask seed's share
            } else if dropped.contains(&j) {
                0 // the masking secret's share
            } else {
                continue;
            };
            let theirs = self.keys.get(&j).ok_or(SecAggError::MissingKeys(j))?;
            let key = agree(
                &self.sealing,
                &theirs.sealing,
                SHARE_LABEL,
                &self.settings.round,
            );
            let plain = open(&key, j, self.index, sealed)?;
            if plain.len() != 2 * SHARE_BYTES {
                return Err(SecAggError::Malformed(format!(
                    "shares from {j} of {} bytes",
                    plain.len()
                )));
            }
            let mut share = [0u8; SHARE_BYTES];
            share.copy_from_slice(&plain[half..half + SHARE_BYTES]);
            out.push((j, share));
        }
        Ok(out)
    }
}

/// The server's last step: the sum of the survivors' quantized values.
///
/// `shared` are the learners whose step-2 shares were delivered (the server delivers shares
/// only among them); `inputs` the masked inputs by learner index (the survivors, all in
/// `shared`); the learners of `shared` without an input dropped. `shares` are the unmask
/// answers, each (owner, share). Fails, changing nothing, when a survivor's self mask or a
/// dropped learner's secret has fewer than `threshold` shares.
pub fn unmask_sum<V: AsRef<[u32]> + Sync>(
    settings: &RoundSettings,
    keys: &BTreeMap<u32, AdvertisedKeys>,
    shared: &BTreeSet<u32>,
    inputs: &BTreeMap<u32, V>,
    shares: &[(u32, [u8; SHARE_BYTES])],
) -> Result<Vec<u32>, SecAggError> {
    let Some(len) = inputs.values().next().map(|y| y.as_ref().len()) else {
        return Err(SecAggError::TooFewShares { got: 0, needed: 1 });
    };
    if inputs.values().any(|y| y.as_ref().len() != len) {
        return Err(SecAggError::Malformed(
            "masked inputs of different lengths".into(),
        ));
    }
    let mut sum = vec![0u32; len];
    let rows: Vec<&[u32]> = inputs.values().map(AsRef::as_ref).collect();
    sum.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(index, part)| {
            let start = index << 16;
            for y in &rows {
                let y = &y[start..start + part.len()];
                part.iter_mut()
                    .zip(y)
                    .for_each(|(s, v)| *s = s.wrapping_add(*v));
            }
        });
    let survivors: BTreeSet<u32> = inputs.keys().copied().collect();
    unmask_total(settings, keys, shared, &survivors, &mut sum, shares)?;
    Ok(sum)
}

/// [`unmask_sum`] for a server that added the survivors' masked inputs as they arrived
/// (mod 2^32, O(model) memory however many report): removes the masks from `total`, the sum
/// of the inputs of `survivors`, in place. Fails, leaving `total` unchanged, as `unmask_sum`.
pub fn unmask_total(
    settings: &RoundSettings,
    keys: &BTreeMap<u32, AdvertisedKeys>,
    shared: &BTreeSet<u32>,
    survivors: &BTreeSet<u32>,
    total: &mut [u32],
    shares: &[(u32, [u8; SHARE_BYTES])],
) -> Result<(), SecAggError> {
    settings.check()?;
    if let Some(i) = survivors.iter().find(|i| !shared.contains(i)) {
        return Err(SecAggError::Malformed(format!(
            "an input from {i}, who shared no keys"
        )));
    }
    if survivors.is_empty() {
        return Err(SecAggError::TooFewShares { got: 0, needed: 1 });
    }
    let mut by_owner: BTreeMap<u32, Vec<[u8; SHARE_BYTES]>> = BTreeMap::new();
    for (owner, share) in shares {
        by_owner.entry(*owner).or_default().push(*share);
    }
    let t = settings.threshold as usize;
    let rebuild = |owner: u32| -> Result<[u8; 32], SecAggError> {
        let owned = by_owner.get(&owner).map_or(&[][..], Vec::as_slice);
        combine(owned, t).map_err(|error| match error {
            SecAggError::TooFewShares { got, needed } => SecAggError::TooManyDropped {
                learner: owner,
                got,
                needed,
            },
            other => other,
        })
    };
    // Rebuild everything first: an error leaves no half-unmasked sum behind.
    let selves: Vec<[u8; 32]> = survivors
        .iter()
        .map(|&i| rebuild(i))
        .collect::<Result<_, SecAggError>>()?;
    let dropped: Vec<(u32, StaticSecret)> = shared
        .iter()
        .filter(|j| !survivors.contains(j))
        .map(|&j| Ok((j, secret_from(rebuild(j)?))))
        .collect::<Result<_, SecAggError>>()?;
    let mut seeds: Vec<([u8; 32], i8)> = selves.iter().map(|b| (*b, -1)).collect();
    for (j, secret) in &dropped {
        for i in settings
            .neighbours_of(*j)
            .into_iter()
            .filter(|i| survivors.contains(i))
        {
            let key = keys.get(&i).ok_or(SecAggError::MissingKeys(i))?;
            let seed = agree(secret, &key.masking, MASK_LABEL, &settings.round);
            // survivor i added +PRG(s_ij) when i < j: take it back out
            seeds.push((seed, if i < *j { -1 } else { 1 }));
        }
    }
    apply_masks(total, &seeds);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64: deterministic test randomness (learners use a CSPRNG)
            self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        }
        fn bytes32(&mut self) -> [u8; 32] {
            let mut out = [0u8; 32];
            for chunk in out.chunks_exact_mut(8) {
                chunk.copy_from_slice(&self.next().to_le_bytes());
            }
            out
        }
        fn uniform(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn settings(learners: u32, neighbours: u32, threshold: u32) -> RoundSettings {
        RoundSettings {
            round: b"round-1".to_vec(),
            learners,
            neighbours,
            threshold,
            clip: 1.0,
            bits: 16,
        }
    }

    /// Run a round; learners in `before_input` drop after sharing, those in `before_unmask`
    /// after sending their input. Returns (the server's result, the survivors' plain sum).
    fn round(
        s: &RoundSettings,
        len: usize,
        before_input: &[u32],
        before_unmask: &[u32],
    ) -> (Result<Vec<u32>, SecAggError>, Vec<u32>) {
        let mut rng = Rng(42);
        let mut learners: Vec<SecAggLearner> = (0..s.learners)
            .map(|i| SecAggLearner::new(s.clone(), i, || rng.bytes32()).unwrap())
            .collect();
        let keys: BTreeMap<u32, AdvertisedKeys> = learners
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, l.advertise()))
            .collect();
        let mut mail: Vec<(u32, u32, Vec<u8>)> = Vec::new();
        for (i, learner) in learners.iter_mut().enumerate() {
            for (to, sealed) in learner.share(&keys, || rng.next()).unwrap() {
                mail.push((i as u32, to, sealed));
            }
        }
        for (from, to, sealed) in mail {
            learners[to as usize].receive(from, sealed).unwrap();
        }
        let shared: BTreeSet<u32> = (0..s.learners).collect();
        let mut inputs = BTreeMap::new();
        let mut plain = vec![0u32; len];
        for (i, learner) in learners.iter().enumerate() {
            let i = i as u32;
            if before_input.contains(&i) {
                continue;
            }
            let values: Vec<f32> = (0..len)
                .map(|v| ((v as f32 + i as f32) * 0.37).sin())
                .collect();
            let mut seed = Rng(1000 + i as u64);
            let mut again = Rng(1000 + i as u64);
            inputs.insert(i, learner.masked_input(&values, || seed.uniform()).unwrap());
            let q = quantize(&values, s.clip, s.bits, || again.uniform());
            plain
                .iter_mut()
                .zip(q)
                .for_each(|(p, v)| *p = p.wrapping_add(v));
        }
        let survivors: BTreeSet<u32> = inputs.keys().copied().collect();
        let dropped: BTreeSet<u32> = shared.difference(&survivors).copied().collect();
        let mut answers = Vec::new();
        for (i, learner) in learners.iter_mut().enumerate() {
            let i = i as u32;
            if survivors.contains(&i) && !before_unmask.contains(&i) {
                answers.extend(learner.unmask(&survivors, &dropped).unwrap());
            }
        }
        (unmask_sum(s, &keys, &shared, &inputs, &answers), plain)
    }

    #[test]
    fn the_unmasked_sum_equals_the_plain_quantized_sum() {
        let (sum, plain) = round(&settings(8, 4, 3), 1000, &[], &[]);

        assert_eq!(sum.unwrap(), plain);
    }

    #[test]
    fn learners_dropping_after_sharing_are_survived() {
        let (sum, plain) = round(&settings(10, 6, 4), 500, &[2, 7], &[]);

        assert_eq!(sum.unwrap(), plain); // the sum of the 8 that sent inputs
    }

    #[test]
    fn learners_dropping_after_their_input_still_count() {
        let (sum, plain) = round(&settings(10, 6, 4), 500, &[3], &[5]);

        assert_eq!(sum.unwrap(), plain);
    }

    #[test]
    fn too_many_dropouts_void_the_round_with_a_clear_error() {
        // learner 0's neighbours are 8, 9, 1, 2: three drop, only one could answer for it
        let (sum, _) = round(&settings(10, 4, 3), 100, &[8, 9, 1], &[]);

        assert!(
            matches!(sum, Err(SecAggError::TooManyDropped { .. })),
            "{sum:?}"
        );
    }

    #[test]
    fn a_single_masked_input_looks_uniform() {
        let s = settings(6, 4, 3);
        let mut rng = Rng(7);
        let mut learners: Vec<SecAggLearner> = (0..6)
            .map(|i| SecAggLearner::new(s.clone(), i, || rng.bytes32()).unwrap())
            .collect();
        let keys: BTreeMap<u32, AdvertisedKeys> = (0..6)
            .map(|i| (i, learners[i as usize].advertise()))
            .collect();
        let mut mail = Vec::new();
        for (i, learner) in learners.iter_mut().enumerate() {
            for (to, sealed) in learner.share(&keys, || rng.next()).unwrap() {
                mail.push((i as u32, to, sealed));
            }
        }
        for (from, to, sealed) in mail {
            learners[to as usize].receive(from, sealed).unwrap();
        }

        let y = learners[0]
            .masked_input(&vec![0.0; 160_000], || 0.0)
            .unwrap(); // a constant input

        let mut buckets = [0f64; 16];
        for v in &y {
            buckets[(v >> 28) as usize] += 1.0;
        }
        let expected = y.len() as f64 / 16.0;
        let chi2: f64 = buckets
            .iter()
            .map(|b| (b - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 45.0, "chi-square {chi2} over 15 degrees of freedom"); // p < 1e-4
    }

    #[test]
    fn settings_whose_sum_could_wrap_are_refused() {
        let mut s = settings(100, 10, 6);
        s.bits = 26; // 100 x 2^26 > 2^32

        assert!(matches!(s.check(), Err(SecAggError::Settings(m)) if m.contains("wrap")));
    }

    #[test]
    fn a_threshold_of_half_the_neighbours_is_refused() {
        assert!(settings(10, 4, 2).check().is_err());
    }

    #[test]
    fn a_second_unmask_request_is_refused() {
        let s = settings(4, 3, 2);
        let mut rng = Rng(9);
        let mut learner = SecAggLearner::new(s, 0, || rng.bytes32()).unwrap();
        let survivors: BTreeSet<u32> = [0].into();

        learner.unmask(&survivors, &BTreeSet::new()).unwrap();

        assert!(learner.unmask(&survivors, &BTreeSet::new()).is_err());
    }
}
