//! The primitives of SecAgg+, each from a well-kept RustCrypto / dalek crate:
//!
//! - key agreement: X25519 (`x25519-dalek`, the dalek-cryptography implementation);
//! - key derivation: HKDF-SHA256 (`hkdf`, `sha2`) over the full 32-byte shared secret, with a
//!   label per use, so the mask seed and the share-encryption key of a pair are independent;
//! - masks: the ChaCha20 keystream (`chacha20`) keyed by the full 32-byte seed. Flower's SecAgg+
//!   seeds a Mersenne Twister with 32 bits of the secret: 2^32 guesses recover a mask. Here the
//!   mask is as hard to predict as the seed is to guess (2^256);
//! - share encryption: ChaCha20-Poly1305 (`chacha20poly1305`, an audited AEAD), with the
//!   sender and receiver indices in the nonce and the associated data.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hkdf::Hkdf;
use rayon::prelude::*;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

use super::SecAggError;

/// HKDF label of the pairwise mask seed.
pub const MASK_LABEL: &[u8] = b"metis-async/secagg/pairwise-mask/v1";
/// HKDF label of the key that encrypts shares between two learners.
pub const SHARE_LABEL: &[u8] = b"metis-async/secagg/share-key/v1";

/// A fresh X25519 secret from 32 random bytes (the caller's CSPRNG).
pub fn secret_from(bytes: [u8; 32]) -> StaticSecret {
    StaticSecret::from(bytes)
}

/// The public key of `secret`.
pub fn public_of(secret: &StaticSecret) -> [u8; 32] {
    PublicKey::from(secret).to_bytes()
}

/// A 32-byte key both sides of a pair derive: HKDF-SHA256(X25519(mine, theirs), label, round).
pub fn agree(mine: &StaticSecret, theirs: &[u8; 32], label: &[u8], round: &[u8]) -> [u8; 32] {
    let shared = mine.diffie_hellman(&PublicKey::from(*theirs));
    let hkdf = Hkdf::<Sha256>::new(Some(round), shared.as_bytes());
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit (255 x 32): expand cannot fail.
    if hkdf.expand(label, &mut key).is_err() {
        unreachable!("HKDF output of 32 bytes")
    }
    key
}

/// Words of output each thread masks at once (256 KiB).
const MASK_CHUNK: usize = 64 * 1024;

/// Add (`sign` +1) or subtract (-1) the ChaCha20 keystream of each seed to `out`, modulo 2^32.
/// Parallel over contiguous ranges of `out`: each range seeks every keystream to its offset,
/// so the result does not depend on the number of threads.
pub fn apply_masks(out: &mut [u32], seeds: &[([u8; 32], i8)]) {
    out.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(index, part)| {
            let mut bytes = vec![0u8; part.len() * 4];
            for (seed, sign) in seeds {
                let mut cipher = ChaCha20::new(seed.into(), &[0u8; 12].into());
                cipher.seek((index * MASK_CHUNK * 4) as u64);
                bytes.fill(0);
                cipher.apply_keystream(&mut bytes);
                for (value, word) in part.iter_mut().zip(bytes.chunks_exact(4)) {
                    let m = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                    *value = if *sign >= 0 {
                        value.wrapping_add(m)
                    } else {
                        value.wrapping_sub(m)
                    };
                }
            }
        });
}

fn nonce(sender: u32, receiver: u32) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&sender.to_le_bytes());
    bytes[4..8].copy_from_slice(&receiver.to_le_bytes());
    Nonce::from(bytes)
}

/// Encrypt `plaintext` from learner `sender` to learner `receiver` under their pair's key.
pub fn seal(key: &[u8; 32], sender: u32, receiver: u32, plaintext: &[u8]) -> Vec<u8> {
    let aad = [sender.to_le_bytes(), receiver.to_le_bytes()].concat();
    let payload = Payload {
        msg: plaintext,
        aad: &aad,
    };
    match ChaCha20Poly1305::new(key.into()).encrypt(&nonce(sender, receiver), payload) {
        Ok(sealed) => sealed,
        Err(_) => unreachable!("ChaCha20-Poly1305 encrypts any message below 256 GiB"),
    }
}

/// Decrypt what `sender` sealed for `receiver`; an error if it was altered or misaddressed.
pub fn open(
    key: &[u8; 32],
    sender: u32,
    receiver: u32,
    sealed: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let aad = [sender.to_le_bytes(), receiver.to_le_bytes()].concat();
    let payload = Payload {
        msg: sealed,
        aad: &aad,
    };
    ChaCha20Poly1305::new(key.into())
        .decrypt(&nonce(sender, receiver), payload)
        .map_err(|_| {
            SecAggError::Malformed(format!(
                "shares from learner {sender} to {receiver} do not authenticate"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_of_a_pair_agree_and_labels_separate_keys() {
        let (a, b) = (secret_from([1; 32]), secret_from([2; 32]));
        let (pa, pb) = (public_of(&a), public_of(&b));

        let mask_ab = agree(&a, &pb, MASK_LABEL, b"r1");
        let mask_ba = agree(&b, &pa, MASK_LABEL, b"r1");

        assert_eq!(mask_ab, mask_ba);
        assert_ne!(mask_ab, agree(&a, &pb, SHARE_LABEL, b"r1"));
        assert_ne!(mask_ab, agree(&a, &pb, MASK_LABEL, b"r2"));
    }

    #[test]
    fn a_mask_added_then_subtracted_cancels() {
        let mut values: Vec<u32> = (0..100_000).collect();
        let seed = [7u8; 32];

        apply_masks(&mut values, &[(seed, 1)]);
        let masked = values.clone();
        apply_masks(&mut values, &[(seed, -1)]);

        assert_ne!(masked[..10], (0..10).collect::<Vec<u32>>()[..]);
        assert_eq!(values, (0..100_000).collect::<Vec<u32>>());
    }

    #[test]
    fn the_parallel_mask_is_one_continuous_keystream() {
        let seed = [5u8; 32];
        let mut sequential = vec![0u8; (MASK_CHUNK * 3 + 17) * 4];
        ChaCha20::new((&seed).into(), &[0u8; 12].into()).apply_keystream(&mut sequential);
        let mut masked = vec![0u32; MASK_CHUNK * 3 + 17];

        apply_masks(&mut masked, &[(seed, 1)]);

        let expected: Vec<u32> = sequential
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        assert_eq!(masked, expected);
    }

    #[test]
    fn a_sealed_share_opens_only_unaltered_and_as_addressed() {
        let key = [3u8; 32];
        let sealed = seal(&key, 1, 2, b"share");
        let mut altered = sealed.clone();
        altered[0] ^= 1;

        assert_eq!(open(&key, 1, 2, &sealed).unwrap(), b"share");
        assert!(open(&key, 1, 2, &altered).is_err());
        assert!(open(&key, 2, 1, &sealed).is_err());
    }
}
