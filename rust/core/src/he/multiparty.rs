//! Multiparty BFV: a committee of P parties (learners) holds the secret key in shares, so that
//! decrypting anything takes a decryption share from **every** party (P-of-P, no threshold).
//!
//! # Protocols (Mouchet et al., "Multiparty homomorphic encryption from ring-learning-with-errors",
//! PETS 2021; the ones `fhe::mbfv` implements)
//!
//! - Common random polynomial: `a`, uniform mod q, derived from a public 32-byte seed (the CRS,
//!   picked by the controller) with the ChaCha20 keystream ([`HeParty::key_share`] documents
//!   the derivation), so every party computes the same `a`.
//! - Collective key generation: party i samples a uniform ternary secret s_i and publishes
//!   p_i = -a s_i + e_i (e_i from fhe.rs's error distribution, derived from s_i so a party
//!   publishes one share however often it is asked); the collective public key is
//!   (sum p_i, a), an ordinary fhe.rs `PublicKey` for the secret s = sum s_i, written in the
//!   bytes `PublicKey::from_bytes` reads, so [`HeContext::encrypt`] uses it unchanged.
//! - Decryption: for a ciphertext (c0, c1) party i sends d_i = s_i c1 + E_i, E_i smudging
//!   noise; c0 + sum d_i = Delta m + v + sum E_i is decoded as in [`HeContext::decrypt`].
//!
//! `fhe::mbfv` cannot be used as it is: its shares (`PublicKeyShare`, `DecryptionShare`) have
//! private fields and no serialization, so they cannot leave the process that made them, and
//! its decryption shares add noise of variance 10 only (no smudging yet). The protocols are
//! implemented here on `fhe_math` polynomials, in our own wire formats.
//!
//! # What this protects, and what it does not
//!
//! No single party can decrypt: not the controller (it holds no secret at all, only key and
//! decryption shares, which are public), and not one learner, nor any P - 1 of them together:
//! without the last party's share the sum is masked by s_j c1, uniformly random. Every party
//! must cooperate, so one party that leaves or loses its secret blocks decryption for good (a
//! new committee and key are needed). Shares are bound to the ciphertext they were made for
//! (a SHA-256 digest) and to their committee: a share decrypts only the ciphertext it was made
//! for, and combining refuses shares mixed from different ciphertexts or committees.
//!
//! Not protected: all P parties colluding (they hold the key together); malicious share
//! contents: nothing proves that a share was computed honestly (no zero-knowledge proofs), so
//! a party can make the decryption wrong, and the protocol is only as private as the parties
//! are honest about their noise; and what the parties are asked to decrypt: a party makes
//! shares for whatever ciphertexts it is given, so a controller that sends one learner's
//! ciphertext instead of the sum gets that update decrypted, unless the parties check what
//! they sign off (e.g. recompute the sum from the updates they are shown; not done here). Whoever combines the shares learns the sum's noise (smudged)
//! besides the sum, as the key holder does in the shared-key mode; that noise includes how
//! often the weighted plaintext wrapped mod t at each coefficient (negative values are stored
//! mod t, module docs of `he`), roughly the weighted share of negative values there.
//!
//! # Smudging and the noise budget ([`Smudging`])
//!
//! With the collective key, s = sum s_i has |s| <= P and the key's error e = sum e_i has
//! |e| <= 20 P (fhe.rs samples errors, and the encryption's u, e1, e2, from a centered binomial
//! of variance 10, |x| <= 20). A fresh ciphertext's phase noise u e + e1 + e2 s is at most
//! v = 400 N P + 20 N P + 20, and a sum of total weight W adds up to W wraps of (q mod t) < t:
//! the sum's noise is at most W (v + t). Each party adds E_i uniform in [-2^b, 2^b), so the
//! combined noise is below W (v + t) + P 2^b, and decryption is exact while that is below
//! q / 2t: b is the largest that fits with W = `max_total_weight` and a factor 2 to spare (at
//! most 120). The margin b - log2(W v) is how many bits the smudging noise exceeds the
//! worst-case key-dependent noise it hides; committees below 16 bits are refused. With the
//! defaults (N = 4096, q of 109 bits, t = 2^40, W = 2^20), b = 65 and the margin 22.7 bits for
//! 3 parties, b = 63 and 19.0 bits for 10. Against the noise's typical size (6 sigma, ~2^10
//! below the worst case) that is ~30 bits: about what OpenFHE's default multiparty mode floods
//! with (a fixed 20 bits), not a 2^-40 statistical distance over every coefficient. Raise it
//! by lowering `max_total_weight` (1 bit a halving) or adding modulus bits (degree 8192 with 218
//! bits: b = 120, margin ~75 bits).

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use fhe::bfv::{BfvParameters, Ciphertext};
use fhe_math::rns::ScalingFactor;
use fhe_math::rq::scaler::Scaler;
use fhe_math::rq::{traits::TryConvertFrom, Context, Poly, Representation};
use fhe_traits::Serialize;
use rand::Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::format::{self, word};
use super::{cipher, HeContext, HeError, Result};

/// Bytes of the common reference string (the seed of the common random polynomial).
pub const CRS_BYTES: usize = 32;

const SECRET_MAGIC: &[u8; 4] = b"MPS1";
const KEY_SHARE_MAGIC: &[u8; 4] = b"MPK1";
const DECRYPTION_SHARE_MAGIC: &[u8; 4] = b"MPD1";
/// Bytes of a committee's identity (SHA-256 of the CRS and the size, truncated).
const COMMITTEE_ID_BYTES: usize = 16;
/// magic, party index (u32), parties (u32), committee id.
const HEADER_BYTES: usize = 4 + 4 + 4 + COMMITTEE_ID_BYTES;
const DIGEST_BYTES: usize = 32;
/// fhe.rs's error distribution (centered binomial, variance 10) is bounded by 2 x 10.
const ERROR_MAX: f64 = 20.0;
const SMUDGING_MAX_BITS: u32 = 120;
const MIN_MARGIN_BITS: f64 = 16.0;

/// The smudging noise of a committee's decryption shares (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Smudging {
    /// Every party adds noise uniform in [-2^bits, 2^bits) to each coefficient of its share.
    pub bits: u32,
    /// log2 of 2^bits over the worst-case key-dependent noise of a sum of total weight
    /// `max_total_weight`.
    pub margin_bits: f64,
}

impl Smudging {
    /// The largest smudging noise `parties` parties can add under `ctx`'s settings with the
    /// decryption of any sum still exact; refuses committees whose margin is below 16 bits.
    pub fn new(ctx: &HeContext, parties: usize) -> Result<Self> {
        if parties == 0 || parties > u32::MAX as usize {
            return Err(HeError::Committee(format!(
                "a committee has 1 to 2^32 - 1 parties, got {parties}"
            )));
        }
        let settings = &ctx.settings;
        let p = parties as f64;
        let n = settings.degree as f64;
        let weight = settings.max_total_weight as f64;
        let t_bits = settings.plaintext_bits as f64;
        let q_bits: f64 = ctx.params.moduli().iter().map(|&q| (q as f64).log2()).sum();
        let fresh = n * ERROR_MAX * ERROR_MAX * p + n * ERROR_MAX * p + ERROR_MAX;
        let sum_noise = weight * (fresh + 2f64.powf(t_bits));
        let room = 2f64.powf(q_bits - 1.0 - t_bits); // q / 2t
        let refuse = |why: String| {
            Err(HeError::Settings(format!(
                "{why}: a committee of {parties} parties needs more noise budget; lower \
                 max_total_weight or plaintext_bits, or add modulus bits"
            )))
        };
        if sum_noise >= room {
            return refuse(format!(
                "the noise of a sum ({sum_noise:.3e}) leaves no room below q/2t ({room:.3e})"
            ));
        }
        let fits = ((room - sum_noise) / p).log2().floor() - 1.0;
        let bits = fits.min(SMUDGING_MAX_BITS as f64);
        let margin_bits = bits - (weight * fresh).log2();
        if bits < 1.0 || margin_bits < MIN_MARGIN_BITS {
            return refuse(format!(
                "smudging noise of 2^{bits} is only {margin_bits:.1} bits above the noise it \
                 hides (at least {MIN_MARGIN_BITS})"
            ));
        }
        Ok(Self {
            bits: bits as u32,
            margin_bits,
        })
    }
}

/// One committee member: its ternary secret share s_i, its index among the `parties`, and the
/// committee's CRS. The secret is wiped when the party is dropped (copies made by
/// [`secret`](Self::secret) are the caller's to keep safe).
pub struct HeParty {
    ctx: HeContext,
    index: usize,
    parties: usize,
    crs: [u8; CRS_BYTES],
    smudging: Smudging,
    /// s_i's coefficients in {-1, 0, 1}, power basis.
    secret: Vec<i8>,
}

impl fmt::Debug for HeParty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeParty")
            .field("index", &self.index)
            .field("parties", &self.parties)
            .field("smudging", &self.smudging)
            .finish_non_exhaustive()
    }
}

impl Drop for HeParty {
    fn drop(&mut self) {
        self.secret.fill(0);
        std::hint::black_box(&self.secret);
    }
}

impl HeParty {
    /// Party `index` (0-based) of a committee of `parties` with the common reference string
    /// `crs` (32 bytes), with a new secret from the operating system's randomness.
    pub fn generate(ctx: HeContext, index: usize, parties: usize, crs: &[u8]) -> Result<Self> {
        let crs = crs_array(crs)?;
        let smudging = check_member(&ctx, index, parties)?;
        let mut rng = rand::rng();
        let secret = (0..ctx.settings.degree)
            .map(|_| rng.random_range(-1i8..=1))
            .collect();
        Ok(Self {
            ctx,
            index,
            parties,
            crs,
            smudging,
            secret,
        })
    }

    /// The party saved by [`secret`](Self::secret) (a learner restarting), checked against
    /// `ctx`'s degree.
    pub fn from_secret(ctx: HeContext, bytes: &[u8]) -> Result<Self> {
        let malformed = |reason: String| HeError::Malformed {
            what: "party secret",
            reason,
        };
        let degree = ctx.settings.degree;
        let expected = 4 + 4 + 4 + CRS_BYTES + degree / 4;
        if bytes.len() != expected || &bytes[..4] != SECRET_MAGIC {
            return Err(malformed(format!(
                "{} bytes; expected {expected} starting with {SECRET_MAGIC:?}",
                bytes.len()
            )));
        }
        let (index, parties) = (read_u32(&bytes[4..8]), read_u32(&bytes[8..12]));
        let crs = crs_array(&bytes[12..12 + CRS_BYTES])?;
        let secret = bytes[12 + CRS_BYTES..]
            .iter()
            .flat_map(|&b| (0..4).map(move |k| (b >> (2 * k)) & 3))
            .map(|code| match code {
                0 => Ok(0i8),
                1 => Ok(1),
                2 => Ok(-1),
                _ => Err(malformed("a coefficient code beyond {-1, 0, 1}".into())),
            })
            .collect::<Result<Vec<i8>>>()?;
        let smudging = check_member(&ctx, index, parties)?;
        Ok(Self {
            ctx,
            index,
            parties,
            crs,
            smudging,
            secret,
        })
    }

    /// The party's state to persist (keep it like a private key, e.g. a 0600 file): "MPS1",
    /// index and parties (u32 LE), the CRS, then s_i at 2 bits a coefficient (N / 4 bytes).
    pub fn secret(&self) -> Vec<u8> {
        let mut out = SECRET_MAGIC.to_vec();
        out.extend((self.index as u32).to_le_bytes());
        out.extend((self.parties as u32).to_le_bytes());
        out.extend(self.crs);
        out.extend(self.secret.chunks(4).map(|four| {
            four.iter().enumerate().fold(0u8, |byte, (k, &c)| {
                let code = match c {
                    1 => 1u8,
                    -1 => 2,
                    _ => 0,
                };
                byte | (code << (2 * k))
            })
        }));
        out
    }

    /// This party's index in the committee (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Parties in the committee.
    pub fn parties(&self) -> usize {
        self.parties
    }

    /// The committee's common reference string.
    pub fn crs(&self) -> [u8; CRS_BYTES] {
        self.crs
    }

    /// The smudging noise this party adds to its decryption shares.
    pub fn smudging(&self) -> Smudging {
        self.smudging
    }

    /// This party's share of the collective public key, p_i = -a s_i + e_i: the same bytes on
    /// every call (e_i is derived from the secret with ChaCha20, so no two shares of one s_i
    /// with different errors ever exist). `a` is uniform mod each q_j in the NTT domain:
    /// ChaCha20 keyed by SHA-256("metis-async/he-crs/v1" || crs), nonce j (u32 LE), read as
    /// u64 LE words masked to q_j's bit length, those >= q_j rejected.
    pub fn key_share(&self) -> Result<Vec<u8>> {
        let params = &self.ctx.params;
        let ctx0 = level_zero(params)?;
        let a = common_random_poly(params, &self.crs)?;
        let s = self.secret_poly()?;
        let key = Sha256::new()
            .chain_update(b"metis-async/he-key-share-error/v1")
            .chain_update(self.secret())
            .finalize();
        let mut stream = vec![0u8; 5 * params.degree()];
        ChaCha20::new(&key, &[0u8; 12].into()).apply_keystream(&mut stream);
        let errors: Vec<i64> = stream
            .chunks_exact(5)
            .map(|c| {
                let bits = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], 0, 0, 0]);
                (bits & 0xfffff).count_ones() as i64 - (bits >> 20).count_ones() as i64
            })
            .collect();
        stream.fill(0);
        let mut e =
            Poly::try_convert_from(errors.as_slice(), ctx0, false, Representation::PowerBasis)
                .map_err(|e| HeError::malformed("key share", e))?;
        e.change_representation(Representation::Ntt);
        let mut share = -(&a * &s);
        share += &e;
        let mut out = self.header(KEY_SHARE_MAGIC);
        push_limbs(&mut out, &share);
        Ok(out)
    }

    /// This party's decryption share of each ciphertext (the wire format of `format`, e.g. a
    /// [`CipherSum`](super::CipherSum)'s output), in parallel: d_i = s_i c1 + E_i with fresh
    /// smudging noise from the operating system's randomness. Each share is "MPD1", index,
    /// parties, committee id, SHA-256 of the ciphertext, then d_i's NTT limbs (u64 LE).
    pub fn decryption_shares(&self, ciphertexts: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let params = &self.ctx.params;
        let ctx0 = level_zero(params)?;
        let s = self.secret_poly()?;
        let per_poly = params.moduli().len() * params.degree() * 8;
        let header = self.header(DECRYPTION_SHARE_MAGIC);
        ciphertexts
            .par_iter()
            .map(|bytes| {
                let body = format::limbs(bytes, params)?;
                let mut d = poly_from_limbs(&body[per_poly..], ctx0, "ciphertext")?;
                d *= &s;
                d += &smudging_poly(ctx0, params.degree(), self.smudging.bits)?;
                let mut out = Vec::with_capacity(header.len() + DIGEST_BYTES + per_poly);
                out.extend_from_slice(&header);
                out.extend(ciphertext_digest(bytes));
                push_limbs(&mut out, &d);
                Ok(out)
            })
            .collect()
    }

    fn header(&self, magic: &[u8; 4]) -> Vec<u8> {
        let mut out = magic.to_vec();
        out.extend((self.index as u32).to_le_bytes());
        out.extend((self.parties as u32).to_le_bytes());
        out.extend(committee_id(&self.crs, self.parties));
        out
    }

    /// s_i in the NTT domain.
    fn secret_poly(&self) -> Result<Poly> {
        let ctx0 = level_zero(&self.ctx.params)?;
        let coefficients: Vec<i64> = self.secret.iter().map(|&c| c as i64).collect();
        let mut s = Poly::try_convert_from(
            coefficients.as_slice(),
            ctx0,
            false,
            Representation::PowerBasis,
        )
        .map_err(|e| HeError::malformed("party secret", e))?;
        s.change_representation(Representation::Ntt);
        Ok(s)
    }
}

/// The collective public key from every party's [`HeParty::key_share`] (in any order), in
/// the bytes of fhe.rs's `PublicKey::to_bytes`, for [`HeContext::encrypt`]. Refuses shares of
/// another committee (CRS or size), a missing or repeated party, malformed bytes.
pub fn collective_public_key(ctx: &HeContext, crs: &[u8], shares: &[&[u8]]) -> Result<Vec<u8>> {
    let crs = crs_array(crs)?;
    let params = &ctx.params;
    let ctx0 = level_zero(params)?;
    let headers = shares
        .iter()
        .map(|share| ShareHeader::read(share, KEY_SHARE_MAGIC, "key share"))
        .collect::<Result<Vec<_>>>()?;
    let parties = check_committee(&headers)?;
    if headers[0].committee != committee_id(&crs, parties) {
        return Err(HeError::Committee(
            "the key shares were made for another common reference string".into(),
        ));
    }
    let moduli = params.moduli();
    let mut sum = vec![0u64; moduli.len() * params.degree()];
    for share in shares {
        let limbs = read_limbs(&share[HEADER_BYTES..], params, "key share")?;
        add_limbs(&mut sum, &limbs, moduli);
    }
    let p0 = Poly::try_convert_from(sum, ctx0, false, Representation::Ntt)
        .map_err(|e| HeError::malformed("key share", e))?;
    let a = common_random_poly(params, &crs)?;
    let key = Ciphertext::new(vec![p0, a], params)
        .map_err(|e| HeError::malformed("key share", e))?
        .to_bytes();
    // fhe.rs's PublicKey is the protobuf message { Ciphertext c = 1; }: tag 0x0a, the
    // length as a varint, the ciphertext's own protobuf bytes.
    let mut out = vec![0x0a];
    let mut len = key.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend(key);
    Ok(out)
}

/// Decrypt a sum of `len` values from its ciphertexts and every party's decryption shares
/// (`shares_per_party[p][k]`: one party's share of ciphertext k; parties in any order), and
/// divide it by `divisor` and the fixed-point scale, as [`HeContext::decrypt`]. Needs no
/// secret. Refuses a missing party (all P must take part), shares of another committee or made
/// for another ciphertext, malformed bytes, before decrypting anything.
pub fn combine(
    ctx: &HeContext,
    ciphertexts: &[&[u8]],
    shares_per_party: &[Vec<&[u8]>],
    len: usize,
    divisor: f64,
) -> Result<Vec<f32>> {
    let factor = ctx.decode_factor(ciphertexts.len(), len, divisor)?;
    let mut headers = Vec::with_capacity(shares_per_party.len());
    for (p, shares) in shares_per_party.iter().enumerate() {
        if shares.len() != ciphertexts.len() {
            return Err(HeError::CiphertextCount {
                what: "a party's decryption shares",
                got: shares.len(),
                expected: ciphertexts.len(),
            });
        }
        let Some(first) = shares.first() else {
            return Err(HeError::Decrypt("nothing to decrypt".into()));
        };
        let first = ShareHeader::read(first, DECRYPTION_SHARE_MAGIC, "decryption share")?;
        for share in &shares[1..] {
            let header = ShareHeader::read(share, DECRYPTION_SHARE_MAGIC, "decryption share")?;
            if header != first {
                return Err(HeError::Committee(format!(
                    "shares_per_party[{p}] mixes the shares of parties {} and {}",
                    first.index, header.index
                )));
            }
        }
        headers.push(first);
    }
    check_committee(&headers)?;
    let params = &ctx.params;
    let decoder = Decoder::new(ctx)?;
    let per_poly = params.moduli().len() * params.degree() * 8;
    let parts = ciphertexts
        .par_iter()
        .enumerate()
        .map(|(k, bytes)| {
            let body = format::limbs(bytes, params)?;
            let digest = ciphertext_digest(bytes);
            let mut phase = read_limbs(&body[..per_poly], params, "ciphertext")?;
            for (shares, header) in shares_per_party.iter().zip(&headers) {
                let share = &shares[k][HEADER_BYTES..];
                let Some((made_for, limbs)) = share.split_at_checked(DIGEST_BYTES) else {
                    return Err(HeError::malformed(
                        "decryption share",
                        "no ciphertext digest",
                    ));
                };
                if made_for != digest {
                    return Err(HeError::ShareMismatch {
                        party: header.index,
                        ciphertext: k,
                    });
                }
                let limbs = read_limbs(limbs, params, "decryption share")?;
                add_limbs(&mut phase, &limbs, params.moduli());
            }
            let sums = decoder.decode(phase)?;
            Ok(cipher::scaled(&sums, factor))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut out: Vec<f32> = parts.into_iter().flatten().collect();
    out.truncate(len);
    Ok(out)
}

/// The BFV decoding of phases c0 + c1 s (NTT limbs): round(t x / q) mod t, centered, as
/// fhe.rs's `SecretKey::try_decrypt` and `Plaintext` decoding do.
struct Decoder {
    ctx0: Arc<Context>,
    scaler: Scaler,
    t: u64,
}

impl Decoder {
    fn new(ctx: &HeContext) -> Result<Self> {
        let params = &ctx.params;
        let ctx0 = level_zero(params)?.clone();
        let settings = |e: fhe_math::Error| HeError::Settings(e.to_string());
        let plain = Context::new_arc(&params.moduli()[..1], params.degree()).map_err(settings)?;
        let t = 1u64 << ctx.settings.plaintext_bits;
        let scaler = Scaler::new(&ctx0, &plain, ScalingFactor::new(&t.into(), ctx0.modulus()))
            .map_err(settings)?;
        Ok(Self { ctx0, scaler, t })
    }

    fn decode(&self, phase: Vec<u64>) -> Result<Vec<i64>> {
        let mut poly = Poly::try_convert_from(phase, &self.ctx0, false, Representation::Ntt)
            .map_err(|e| HeError::malformed("decryption share", e))?;
        poly.change_representation(Representation::PowerBasis);
        let scaled = poly
            .scale(&self.scaler)
            .map_err(|e| HeError::malformed("decryption share", e))?;
        let (t, q0) = (self.t, self.ctx0.moduli()[0]);
        Ok(Vec::<u64>::from(&scaled)
            .iter()
            .map(|&v| {
                let w = ((v + t) % q0) % t; // v < q0 < 2^62, t <= 2^60
                if w >= t >> 1 {
                    w as i64 - t as i64
                } else {
                    w as i64
                }
            })
            .collect())
    }
}

/// The fixed part of a key or decryption share.
#[derive(Debug, Clone, PartialEq)]
struct ShareHeader {
    index: usize,
    parties: usize,
    committee: [u8; COMMITTEE_ID_BYTES],
}

impl ShareHeader {
    fn read(bytes: &[u8], magic: &[u8; 4], what: &'static str) -> Result<Self> {
        if bytes.len() < HEADER_BYTES || &bytes[..4] != magic {
            return Err(HeError::Malformed {
                what,
                reason: format!("{} bytes, not starting with {magic:?}", bytes.len()),
            });
        }
        let mut committee = [0u8; COMMITTEE_ID_BYTES];
        committee.copy_from_slice(&bytes[12..HEADER_BYTES]);
        let (index, parties) = (read_u32(&bytes[4..8]), read_u32(&bytes[8..12]));
        if index >= parties {
            return Err(HeError::Malformed {
                what,
                reason: format!("party {index} of a committee of {parties}"),
            });
        }
        Ok(Self {
            index,
            parties,
            committee,
        })
    }
}

/// The committee size of a set of share headers: one committee, every party exactly once.
fn check_committee(headers: &[ShareHeader]) -> Result<usize> {
    let Some(first) = headers.first() else {
        return Err(HeError::Committee("no shares".into()));
    };
    if headers
        .iter()
        .any(|h| h.parties != first.parties || h.committee != first.committee)
    {
        return Err(HeError::Committee(
            "the shares come from different committees".into(),
        ));
    }
    let seen: BTreeSet<usize> = headers.iter().map(|h| h.index).collect();
    if seen.len() != headers.len() {
        return Err(HeError::Committee(
            "a party's shares are given twice".into(),
        ));
    }
    let missing: Vec<usize> = (0..first.parties).filter(|i| !seen.contains(i)).collect();
    if !missing.is_empty() {
        return Err(HeError::Committee(format!(
            "every one of the {} parties must take part (P-of-P); missing parties {missing:?}",
            first.parties
        )));
    }
    Ok(first.parties)
}

fn check_member(ctx: &HeContext, index: usize, parties: usize) -> Result<Smudging> {
    let smudging = Smudging::new(ctx, parties)?;
    if index >= parties {
        return Err(HeError::Committee(format!(
            "party index {index} is not below the committee size {parties}"
        )));
    }
    Ok(smudging)
}

fn crs_array(crs: &[u8]) -> Result<[u8; CRS_BYTES]> {
    crs.try_into().map_err(|_| HeError::Malformed {
        what: "common reference string",
        reason: format!("{} bytes; expected {CRS_BYTES}", crs.len()),
    })
}

fn committee_id(crs: &[u8; CRS_BYTES], parties: usize) -> [u8; COMMITTEE_ID_BYTES] {
    let digest = Sha256::new()
        .chain_update(b"metis-async/he-committee/v1")
        .chain_update(crs)
        .chain_update((parties as u32).to_le_bytes())
        .finalize();
    let mut out = [0u8; COMMITTEE_ID_BYTES];
    out.copy_from_slice(&digest[..COMMITTEE_ID_BYTES]);
    out
}

fn ciphertext_digest(bytes: &[u8]) -> [u8; DIGEST_BYTES] {
    Sha256::new()
        .chain_update(b"metis-async/he-ciphertext/v1")
        .chain_update(bytes)
        .finalize()
        .into()
}

/// The common random polynomial `a` of a CRS (derivation: [`HeParty::key_share`]).
fn common_random_poly(params: &BfvParameters, crs: &[u8; CRS_BYTES]) -> Result<Poly> {
    let key = Sha256::new()
        .chain_update(b"metis-async/he-crs/v1")
        .chain_update(crs)
        .finalize();
    let degree = params.degree();
    let mut coefficients = Vec::with_capacity(params.moduli().len() * degree);
    let mut block = vec![0u8; 8 * degree];
    for (j, &q) in params.moduli().iter().enumerate() {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&(j as u32).to_le_bytes());
        let mut stream = ChaCha20::new(&key, &nonce.into());
        let mask = u64::MAX >> q.leading_zeros();
        let row_end = coefficients.len() + degree;
        while coefficients.len() < row_end {
            block.fill(0);
            stream.apply_keystream(&mut block);
            let accepted = block
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(word(c)) & mask)
                .filter(|&c| c < q);
            let room = row_end - coefficients.len();
            coefficients.extend(accepted.take(room));
        }
    }
    Poly::try_convert_from(
        coefficients,
        level_zero(params)?,
        false,
        Representation::Ntt,
    )
    .map_err(|e| HeError::Settings(e.to_string()))
}

/// Noise uniform in [-2^bits, 2^bits) in every coefficient, in the NTT domain.
fn smudging_poly(ctx0: &Arc<Context>, degree: usize, bits: u32) -> Result<Poly> {
    let mut rng = rand::rng();
    let span_mask = (1u128 << (bits + 1)) - 1;
    let noise: Vec<i128> = (0..degree)
        .map(|_| (rng.random::<u128>() & span_mask) as i128 - (1i128 << bits))
        .collect();
    let coefficients: Vec<u64> = ctx0
        .moduli()
        .iter()
        .flat_map(|&q| noise.iter().map(move |&x| x.rem_euclid(q as i128) as u64))
        .collect();
    let mut poly = Poly::try_convert_from(coefficients, ctx0, false, Representation::PowerBasis)
        .map_err(|e| HeError::malformed("decryption share", e))?;
    poly.change_representation(Representation::Ntt);
    Ok(poly)
}

fn level_zero(params: &BfvParameters) -> Result<&Arc<Context>> {
    params
        .context_at_level(0)
        .map_err(|e| HeError::Settings(e.to_string()))
}

/// One polynomial's limbs (modulus, coefficient; u64 LE), each checked below its modulus.
fn read_limbs(bytes: &[u8], params: &BfvParameters, what: &'static str) -> Result<Vec<u64>> {
    let (moduli, degree) = (params.moduli(), params.degree());
    if bytes.len() != moduli.len() * degree * 8 {
        return Err(HeError::Malformed {
            what,
            reason: format!(
                "{} bytes of coefficients; expected {}",
                bytes.len(),
                moduli.len() * degree * 8
            ),
        });
    }
    let limbs: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(word(c)))
        .collect();
    let below = limbs
        .chunks_exact(degree)
        .zip(moduli)
        .all(|(row, &q)| row.iter().all(|&c| c < q));
    if !below {
        return Err(HeError::Malformed {
            what,
            reason: "a coefficient is not below its modulus".into(),
        });
    }
    Ok(limbs)
}

fn poly_from_limbs(bytes: &[u8], ctx0: &Arc<Context>, what: &'static str) -> Result<Poly> {
    let limbs: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(word(c)))
        .collect();
    Poly::try_convert_from(limbs, ctx0, false, Representation::Ntt)
        .map_err(|e| HeError::malformed(what, e))
}

/// acc = acc + other mod q, limb by limb (both below their moduli).
fn add_limbs(acc: &mut [u64], other: &[u64], moduli: &[u64]) {
    let degree = acc.len() / moduli.len().max(1);
    for ((row, add), &q) in acc
        .chunks_exact_mut(degree)
        .zip(other.chunks_exact(degree))
        .zip(moduli)
    {
        for (a, &b) in row.iter_mut().zip(add) {
            let s = *a + b; // both < 2^62
            *a = if s >= q { s - q } else { s };
        }
    }
}

fn push_limbs(out: &mut Vec<u8>, poly: &Poly) {
    for row in poly.coefficients().outer_iter() {
        out.extend(row.iter().flat_map(|c| c.to_le_bytes()));
    }
}

fn read_u32(bytes: &[u8]) -> usize {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::he::{CipherSum, HeSettings};
    use fhe::bfv::PublicKey;
    use fhe_traits::DeserializeParametrized;

    const CRS: [u8; CRS_BYTES] = [7; CRS_BYTES];

    fn context() -> HeContext {
        HeContext::new(HeSettings::default()).unwrap()
    }

    fn committee(ctx: &HeContext, parties: usize) -> (Vec<HeParty>, Vec<u8>) {
        let members: Vec<HeParty> = (0..parties)
            .map(|i| HeParty::generate(ctx.clone(), i, parties, &CRS).unwrap())
            .collect();
        let shares: Vec<Vec<u8>> = members.iter().map(|m| m.key_share().unwrap()).collect();
        let key = collective_public_key(ctx, &CRS, &refs(&shares)).unwrap();
        (members, key)
    }

    fn refs(lists: &[Vec<u8>]) -> Vec<&[u8]> {
        lists.iter().map(Vec::as_slice).collect()
    }

    fn all_shares(members: &[HeParty], ciphertexts: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
        members
            .iter()
            .map(|m| m.decryption_shares(&refs(ciphertexts)).unwrap())
            .collect()
    }

    fn nested(shares: &[Vec<Vec<u8>>]) -> Vec<Vec<&[u8]>> {
        shares.iter().map(|s| refs(s)).collect()
    }

    /// c0 + the given parties' d_i, unchecked (combine refuses fewer than all parties).
    fn phase(ctx: &HeContext, ciphertext: &[u8], shares: &[&[u8]]) -> Vec<u64> {
        let body = format::limbs(ciphertext, &ctx.params).unwrap();
        let mut phase = read_limbs(&body[..body.len() / 2], &ctx.params, "c0").unwrap();
        for share in shares {
            let limbs = &share[HEADER_BYTES + DIGEST_BYTES..];
            let limbs = read_limbs(limbs, &ctx.params, "share").unwrap();
            add_limbs(&mut phase, &limbs, ctx.params.moduli());
        }
        phase
    }

    fn values(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i % 33) as f32 - 16.0) / 8.0).collect()
    }

    fn round_trip(parties: usize) {
        let ctx = context();
        let (members, key) = committee(&ctx, parties);
        let x = values(5000);

        let ciphertexts = ctx.encrypt(&key, &x).unwrap();
        let shares = all_shares(&members, &ciphertexts);
        let back = combine(&ctx, &refs(&ciphertexts), &nested(&shares), x.len(), 1.0).unwrap();

        assert_eq!(back, x, "{parties} parties");
    }

    #[test]
    fn one_party_round_trips() {
        round_trip(1);
    }

    #[test]
    fn three_parties_round_trip() {
        round_trip(3);
    }

    #[test]
    fn ten_parties_round_trip() {
        round_trip(10);
    }

    #[test]
    fn the_collective_key_is_in_fhe_rs_public_key_bytes() {
        let ctx = context();
        let (_, key) = committee(&ctx, 3);

        let parsed = PublicKey::from_bytes(&key, &ctx.params).unwrap();

        assert_eq!(parsed.to_bytes(), key);
    }

    #[test]
    fn key_shares_are_deterministic_and_parties_survive_a_restart() {
        let ctx = context();
        let party = HeParty::generate(ctx.clone(), 1, 3, &CRS).unwrap();

        let restored = HeParty::from_secret(ctx, &party.secret()).unwrap();

        assert_eq!(restored.key_share().unwrap(), party.key_share().unwrap());
        assert_eq!((restored.index(), restored.parties()), (1, 3));
        assert_eq!(restored.secret(), party.secret());
    }

    #[test]
    fn a_missing_party_blocks_decryption() {
        let ctx = context();
        let (members, key) = committee(&ctx, 3);
        let ciphertexts = ctx.encrypt(&key, &[0.5; 10]).unwrap();
        let shares = all_shares(&members, &ciphertexts);

        let error = combine(&ctx, &refs(&ciphertexts), &nested(&shares[..2]), 10, 1.0).unwrap_err();

        assert!(
            matches!(&error, HeError::Committee(m) if m.contains("missing parties [2]")),
            "{error}"
        );
    }

    #[test]
    fn all_parties_but_one_decrypt_to_noise() {
        let ctx = context();
        let (members, key) = committee(&ctx, 3);
        let x = values(4096);
        let ciphertexts = ctx.encrypt(&key, &x).unwrap();
        let shares = all_shares(&members[..2], &ciphertexts);
        let shares: Vec<&[u8]> = shares.iter().map(|s| s[0].as_slice()).collect();

        let sums = Decoder::new(&ctx)
            .unwrap()
            .decode(phase(&ctx, &ciphertexts[0], &shares))
            .unwrap();

        let far = sums
            .iter()
            .zip(&x)
            .filter(|(&m, &v)| (m as f64 / 65536.0 - v as f64).abs() > 1.0)
            .count();
        assert!(far > 4000, "only {far} of 4096 values far from the truth");
    }

    #[test]
    fn the_weighted_sum_decrypts_collectively_to_the_weighted_average() {
        let ctx = context();
        let (members, key) = committee(&ctx, 3);
        let a: Vec<f32> = (0..5000).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let b: Vec<f32> = (0..5000).map(|i| -((i % 5) as f32) * 0.125).collect();
        let mut sum = CipherSum::new(ctx.clone());
        sum.add(&refs(&ctx.encrypt(&key, &a).unwrap()), 3).unwrap();
        sum.add(&refs(&ctx.encrypt(&key, &b).unwrap()), 1).unwrap();
        let ciphertexts = sum.to_bytes();

        let shares = all_shares(&members, &ciphertexts);
        let out = combine(&ctx, &refs(&ciphertexts), &nested(&shares), 5000, 4.0).unwrap();

        for i in 0..5000 {
            assert_eq!(out[i], (3.0 * a[i] + b[i]) / 4.0, "index {i}");
        }
    }

    #[test]
    fn the_worst_case_weight_and_committee_still_decrypt_exactly() {
        let ctx = context();
        let limit = ctx.settings.max_total_weight;
        let (members, key) = committee(&ctx, 10);
        let low = vec![-4.0f32; 4096]; // -clip: stored mod t, wraps at every weight
        let high: Vec<f32> = (0..4096)
            .map(|i| if i % 2 == 0 { 4.0 } else { -4.0 })
            .collect();
        let mut sum = CipherSum::new(ctx.clone());
        sum.add(&refs(&ctx.encrypt(&key, &low).unwrap()), limit - 1)
            .unwrap();
        sum.add(&refs(&ctx.encrypt(&key, &high).unwrap()), 1)
            .unwrap();
        let ciphertexts = sum.to_bytes();

        let shares = all_shares(&members, &ciphertexts);
        let out = combine(&ctx, &refs(&ciphertexts), &nested(&shares), 4096, 1.0).unwrap();

        let shares: Vec<&[u8]> = shares.iter().map(|s| s[0].as_slice()).collect();
        let mut noisier = phase(&ctx, &ciphertexts[0], &shares);
        let extra = 10u128 << Smudging::new(&ctx, 10).unwrap().bits; // P 2^b more: the spare half
        let rows: Vec<u64> = ctx
            .params
            .moduli()
            .iter()
            .flat_map(|&q| vec![(extra % q as u128) as u64; 4096])
            .collect();
        let ctx0 = level_zero(&ctx.params).unwrap();
        let mut extra =
            Poly::try_convert_from(rows, ctx0, false, Representation::PowerBasis).unwrap();
        extra.change_representation(Representation::Ntt);
        add_limbs(&mut noisier, &Vec::<u64>::from(&extra), ctx.params.moduli());
        let noisier = Decoder::new(&ctx).unwrap().decode(noisier).unwrap();

        for (i, &v) in out.iter().enumerate() {
            // integers below 2^24: exact in f32
            let expected = -4.0 * (limit - 1) as f64 + high[i] as f64;
            assert_eq!(v, expected as f32, "index {i}");
            assert_eq!(
                noisier[i] as f64,
                expected * 65536.0,
                "index {i}, more noise"
            );
        }
    }

    #[test]
    fn a_share_for_another_ciphertext_is_refused() {
        let ctx = context();
        let (members, key) = committee(&ctx, 3);
        let ciphertexts = ctx.encrypt(&key, &values(5000)).unwrap();
        let mut shares = all_shares(&members, &ciphertexts);
        shares[1].swap(0, 1);

        let error = combine(&ctx, &refs(&ciphertexts), &nested(&shares), 5000, 1.0).unwrap_err();

        assert!(
            matches!(error, HeError::ShareMismatch { party: 1, .. }),
            "{error}"
        );
    }

    #[test]
    fn shares_of_another_committee_are_refused() {
        let ctx = context();
        let (members, key) = committee(&ctx, 2);
        let stranger = HeParty::generate(ctx.clone(), 1, 2, &[8; CRS_BYTES]).unwrap();
        let ciphertexts = ctx.encrypt(&key, &[1.0; 10]).unwrap();
        let shares = vec![
            members[0].decryption_shares(&refs(&ciphertexts)).unwrap(),
            stranger.decryption_shares(&refs(&ciphertexts)).unwrap(),
        ];

        let error = combine(&ctx, &refs(&ciphertexts), &nested(&shares), 10, 1.0).unwrap_err();

        assert!(matches!(error, HeError::Committee(m) if m.contains("different committees")));
    }

    #[test]
    fn key_shares_of_another_crs_are_refused() {
        let ctx = context();
        let party = HeParty::generate(ctx.clone(), 0, 1, &CRS).unwrap();

        let error = collective_public_key(&ctx, &[9; CRS_BYTES], &[&party.key_share().unwrap()]);

        assert!(matches!(error, Err(HeError::Committee(_))));
    }

    #[test]
    fn malformed_bytes_are_refused() {
        let ctx = context();
        let (members, key) = committee(&ctx, 1);
        let ciphertexts = ctx.encrypt(&key, &[1.0; 10]).unwrap();
        let mut share = members[0].decryption_shares(&refs(&ciphertexts)).unwrap();
        let end = share[0].len();
        share[0][end - 8..].fill(0xff); // the last coefficient beyond its modulus
        let decrypt = |share: &[u8]| combine(&ctx, &refs(&ciphertexts), &[vec![share]], 10, 1.0);

        assert!(matches!(
            decrypt(&share[0]),
            Err(HeError::Malformed {
                what: "decryption share",
                ..
            })
        ));
        assert!(matches!(
            decrypt(&share[0][..end - 1]),
            Err(HeError::Malformed { .. })
        ));
        assert!(matches!(
            decrypt(b"MPD1 garbage"),
            Err(HeError::Malformed { .. })
        ));
        assert!(matches!(
            HeParty::from_secret(ctx.clone(), b"MPS1"),
            Err(HeError::Malformed {
                what: "party secret",
                ..
            })
        ));
        assert!(matches!(
            collective_public_key(&ctx, &CRS, &[b"garbage"]),
            Err(HeError::Malformed {
                what: "key share",
                ..
            })
        ));
        assert!(matches!(
            HeParty::generate(ctx.clone(), 0, 1, b"short"),
            Err(HeError::Malformed { .. })
        ));
    }

    #[test]
    fn a_party_index_beyond_the_committee_is_refused() {
        assert!(matches!(
            HeParty::generate(context(), 3, 3, &CRS),
            Err(HeError::Committee(_))
        ));
    }

    #[test]
    fn the_smudging_fits_the_noise_budget_of_the_defaults() {
        let ctx = context();

        let three = Smudging::new(&ctx, 3).unwrap();
        let ten = Smudging::new(&ctx, 10).unwrap();

        assert_eq!((three.bits, ten.bits), (65, 63));
        assert!((three.margin_bits - 22.7).abs() < 0.1, "{three:?}");
        assert!((ten.margin_bits - 19.0).abs() < 0.1, "{ten:?}");
        assert!(matches!(
            Smudging::new(&ctx, 1000),
            Err(HeError::Settings(_))
        ));
    }
}
