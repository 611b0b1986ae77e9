//! Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization") that own their state
//! next to the model: the policy hands [`ServerOptimizer::step`] the model `x` and the aggregated
//! server delta `d` (the direction to move, `mean(xᵢ − x)` already scaled), and `x` is updated in
//! place.
//!
//! - FedAvg (`Sgd`): `x ← x + η·d`.
//! - FedAvgM (`Momentum`): heavy-ball momentum without dampening, as `torch.optim.SGD` and
//!   Hsu et al. 2019: `m ← β·m + d; x ← x + η·m`, `m` starting at 0 (so the first step is
//!   FedAvg). In a steady state the step is `η/(1 − β)·d`, ten times `d` for β = 0.9.
//! - FedAdagrad, FedAdam, FedYogi: `m ← β₁·m + (1 − β₁)·d`, then
//!   Adagrad `v ← v + d²`, Adam `v ← β₂·v + (1 − β₂)·d²`,
//!   Yogi `v ← v − (1 − β₂)·d²·sign(v − d²)` (sign(0) = 0), and `x ← x + η·m/(√v + τ)`.
//!   No bias correction; `m` starts at 0 and `v` at τ².
//!
//! The moment vectors are float32, like the model: 4 (FedAvgM) or 8 bytes per parameter rather
//! than 8 or 16 for float64, which matters next to a model of 10⁸–10⁹ parameters. The arithmetic
//! is float32 too, as in `torch.optim` and in numpy implementations of these rules: the stored
//! values would be rounded to float32 anyway, and float64 `sqrt` and division made FedAdam's step
//! 2.7× slower (compute bound at 1M parameters). Hyperparameters are rounded to float32 once
//! (`lr`, `β`, `1 − β`, `τ`). Float32 keeps the moments' precision where it counts: Adagrad's
//! ever-growing `v` only stops absorbing `d²` once `d²/v < 2⁻²⁴`, after ~10⁷ similar rounds, and
//! federated runs have 10³–10⁵. A delta above ~1.8e19 overflows `d²`; that is reported as an error
//! (below), not stored as infinity.
//!
//! A step is validated before anything is written: a first sweep computes every new value without
//! storing it and fails on a non-finite delta or a result that would not fit in float32, a second
//! sweep writes. An `Err` therefore leaves the model and the state exactly as they were, at the
//! price of reading the inputs twice. Everything is elementwise, so the parallel and sequential
//! paths give bit-identical results.
//!
//! Files: `rule` (the rules, hyperparameters and defaults), `kernel` (the sweeps of a step); the
//! optimizer and its state here.

use rayon::prelude::*;
use thiserror::Error;

use crate::accumulate::PARALLEL_MIN;

mod kernel;
mod rule;

pub use rule::{defaults, Adaptive, Hyperparameters, Rule};

/// Parameters per parallel work item: 16 Ki values are 64 KiB of each of `x`, `d`, `m`, `v`.
const CHUNK: usize = 1 << 14;

/// Everything that can go wrong creating or stepping a server optimizer. The bindings turn it
/// into a Python exception (with their own input errors) in one place.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum OptimError {
    /// A kind name that is not one of the known optimizers.
    #[error(
        "unknown server optimizer '{0}'; expected one of fedavg (alias sgd), fedavgm, \
         fedadagrad, fedadam, fedyogi"
    )]
    UnknownKind(String),

    /// A hyperparameter given to a kind that does not use it.
    #[error("{kind} does not take {name}; it takes {takes}")]
    UnusedHyperparameter {
        kind: &'static str,
        name: &'static str,
        takes: &'static str,
    },

    /// A hyperparameter outside its valid range (NaN and infinities included).
    #[error("{name} must be {expected}, got {}", py_float(*value))]
    InvalidHyperparameter {
        name: &'static str,
        value: f64,
        expected: &'static str,
    },

    /// An input whose length differs from the optimizer's.
    #[error("{what} has {got} values, optimizer expects {expected}")]
    LengthMismatch {
        what: &'static str,
        got: usize,
        expected: usize,
    },

    /// A delta with NaN or infinity in it.
    #[error("delta contains non-finite values (first at index {index})")]
    NonFiniteDelta { index: usize },

    /// A step whose result (model or state) would not fit in float32.
    #[error("step would make a non-finite value at index {index} (float32 overflow)")]
    NonFiniteResult { index: usize },

    /// A state vector this kind needs but [`ServerOptimizer::load_state`] was not given.
    #[error("{kind} state needs '{name}'")]
    MissingState {
        kind: &'static str,
        name: &'static str,
    },

    /// A state vector this kind does not have.
    #[error("{kind} has no '{name}' state")]
    UnexpectedState { kind: &'static str, name: String },

    /// A state vector with a value that a step could not have produced.
    #[error("state '{name}' has an invalid value at index {index} (must be {expected})")]
    InvalidState {
        name: &'static str,
        index: usize,
        expected: &'static str,
    },

    /// Memory for the state vectors could not be allocated.
    #[error("cannot allocate optimizer state of {values} float32 values")]
    Allocation { values: usize },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, OptimError>;

/// The optimizer's state, borrowed: the moment vectors the rule keeps (`None` for those it does
/// not) and the number of steps taken. What a checkpoint saves and restores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct State<'a> {
    pub steps: u64,
    pub m: Option<&'a [f32]>,
    pub v: Option<&'a [f32]>,
}

/// A server optimizer for a model of fixed length, with its moment vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptimizer {
    rule: Rule,
    len: usize,
    /// First moment; empty when the rule has none.
    m: Vec<f32>,
    /// Second moment; empty when the rule has none.
    v: Vec<f32>,
    steps: u64,
}

impl ServerOptimizer {
    /// A fresh optimizer for models of `len` parameters: `m = 0`, `v = τ²`. Validates the
    /// hyperparameters and reports a failed allocation as an error instead of aborting.
    pub fn new(rule: Rule, len: usize) -> Result<Self> {
        rule.validate()?;
        let m = if rule.has_m() {
            filled(len, 0.0)?
        } else {
            Vec::new()
        };
        let v = match rule {
            Rule::Adagrad(a) | Rule::Adam(a) | Rule::Yogi(a) => {
                filled(len, (a.tau * a.tau) as f32)?
            }
            _ => Vec::new(),
        };
        Ok(Self {
            rule,
            len,
            m,
            v,
            steps: 0,
        })
    }

    /// The rule and its hyperparameters.
    pub fn rule(&self) -> Rule {
        self.rule
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of successful steps since creation (or as restored by `load_state`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Moves `x` along the server delta `d` by the rule, in place, and updates the moments.
    /// On error (length mismatch, non-finite delta, a result beyond float32) nothing changes.
    pub fn step(&mut self, x: &mut [f32], d: &[f32]) -> Result<()> {
        check_len("params", x.len(), self.len)?;
        check_len("delta", d.len(), self.len)?;
        kernel::apply(self.rule, x, &mut self.m, &mut self.v, d)?;
        self.steps += 1;
        Ok(())
    }

    /// The state to checkpoint: the step count and the moment vectors the rule keeps.
    pub fn state(&self) -> State<'_> {
        State {
            steps: self.steps,
            m: self.rule.has_m().then_some(&self.m[..]),
            v: self.rule.has_v().then_some(&self.v[..]),
        }
    }

    /// Restores a state saved by [`state`](Self::state) from an optimizer of the same kind and
    /// length. Checks that exactly the rule's vectors are given, with the right length, `m`
    /// finite and `v` finite and ≥ 0; on error nothing changes.
    pub fn load_state(&mut self, state: State<'_>) -> Result<()> {
        let kind = self.rule.name();
        for (name, has, given) in [
            ("m", self.rule.has_m(), state.m),
            ("v", self.rule.has_v(), state.v),
        ] {
            match (has, given) {
                (true, None) => return Err(OptimError::MissingState { kind, name }),
                (false, Some(_)) => {
                    return Err(OptimError::UnexpectedState {
                        kind,
                        name: name.to_owned(),
                    })
                }
                (_, Some(values)) => check_len(name, values.len(), self.len)?,
                (false, None) => {}
            }
        }
        if let Some(index) = state.m.and_then(|m| position(m, |x| !x.is_finite())) {
            return Err(OptimError::InvalidState {
                name: "m",
                index,
                expected: "finite",
            });
        }
        // `!(x >= 0)` also catches NaN; +inf is caught separately.
        if let Some(index) = state
            .v
            .and_then(|v| position(v, |x| !(x >= 0.0 && x.is_finite())))
        {
            return Err(OptimError::InvalidState {
                name: "v",
                index,
                expected: "finite and >= 0",
            });
        }
        copy(&mut self.m, state.m);
        copy(&mut self.v, state.v);
        self.steps = state.steps;
        Ok(())
    }
}

/// `len` copies of `value`, or an error if the memory cannot be had.
fn filled(len: usize, value: f32) -> Result<Vec<f32>> {
    let mut values = Vec::new();
    values
        .try_reserve_exact(len)
        .map_err(|_| OptimError::Allocation { values: len })?;
    values.resize(len, value);
    Ok(values)
}

fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(OptimError::LengthMismatch {
            what,
            got,
            expected,
        })
    }
}

/// First index where `bad` holds, scanning chunks in parallel for long inputs.
fn position(values: &[f32], bad: impl Fn(f32) -> bool + Sync) -> Option<usize> {
    let chunk = if values.len() >= PARALLEL_MIN {
        values
            .par_chunks(CHUNK)
            .position_first(|c| c.iter().any(|&x| bad(x)))
    } else {
        values.chunks(CHUNK).position(|c| c.iter().any(|&x| bad(x)))
    }?;
    let start = chunk * CHUNK;
    values[start..]
        .iter()
        .position(|&x| bad(x))
        .map(|i| start + i)
}

/// Copies `source`, when given, over `target` (of the same length).
fn copy(target: &mut [f32], source: Option<&[f32]>) {
    let Some(source) = source else { return };
    if target.len() >= PARALLEL_MIN {
        target
            .par_chunks_mut(CHUNK)
            .zip(source.par_chunks(CHUNK))
            .for_each(|(t, s)| t.copy_from_slice(s));
    } else {
        target.copy_from_slice(source);
    }
}

/// Formats a float as Python's `repr` would for the common cases (`nan`, `inf`, `-1.0`).
fn py_float(x: f64) -> String {
    match x {
        x if x.is_nan() => "nan".into(),
        x if x.is_infinite() => (if x > 0.0 { "inf" } else { "-inf" }).into(),
        x => format!("{x:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic pseudo-random values in [-scale, scale) (xorshift64*).
    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let bits = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                ((bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// The plain definition, one parameter at a time, in float32 with the hyperparameters
    /// rounded to float32 once.
    fn reference_step(rule: Rule, x: &mut [f32], m: &mut [f32], v: &mut [f32], d: &[f32]) {
        for i in 0..x.len() {
            match rule {
                Rule::Sgd { lr } => x[i] += lr as f32 * d[i],
                Rule::Momentum { lr, beta } => {
                    m[i] = beta as f32 * m[i] + d[i];
                    x[i] += lr as f32 * m[i];
                }
                Rule::Adagrad(a) | Rule::Adam(a) | Rule::Yogi(a) => {
                    let (beta1, beta2) = (a.beta1 as f32, a.beta2 as f32);
                    let (rest1, rest2) = ((1.0 - a.beta1) as f32, (1.0 - a.beta2) as f32);
                    m[i] = beta1 * m[i] + rest1 * d[i];
                    let d2 = d[i] * d[i];
                    v[i] = match rule {
                        Rule::Adagrad(_) => v[i] + d2,
                        Rule::Adam(_) => beta2 * v[i] + rest2 * d2,
                        _ if v[i] > d2 => v[i] - rest2 * d2,
                        _ if v[i] < d2 => v[i] + rest2 * d2,
                        _ => v[i],
                    };
                    x[i] += a.lr as f32 * m[i] / (v[i].sqrt() + a.tau as f32);
                }
            }
        }
    }

    fn adam() -> Rule {
        Rule::Adam(Adaptive::default())
    }

    #[test]
    fn sgd_adds_the_scaled_delta() {
        let mut opt = ServerOptimizer::new(Rule::Sgd { lr: 0.5 }, 3).unwrap();
        let mut x = [1.0_f32, 2.0, 3.0];

        opt.step(&mut x, &[2.0, -4.0, 0.0]).unwrap();

        assert_eq!(x, [2.0, 0.0, 3.0]);
        assert_eq!(opt.steps(), 1);
        assert_eq!(
            opt.state(),
            State {
                steps: 1,
                m: None,
                v: None
            }
        );
    }

    #[test]
    fn momentum_starts_as_fedavg_and_then_accumulates() {
        let mut opt = ServerOptimizer::new(Rule::Momentum { lr: 1.0, beta: 0.5 }, 1).unwrap();
        let mut x = [0.0_f32];

        opt.step(&mut x, &[1.0]).unwrap();
        let after_one = x[0];
        opt.step(&mut x, &[1.0]).unwrap();

        assert_eq!(after_one, 1.0);
        // m = 0.5·1 + 1 = 1.5, x = 1 + 1.5
        assert_eq!(x, [2.5]);
        assert_eq!(opt.state().m, Some(&[1.5_f32][..]));
    }

    #[test]
    fn adam_first_step_by_hand() {
        let mut opt = ServerOptimizer::new(adam(), 1).unwrap();
        let mut x = [0.0_f32];

        opt.step(&mut x, &[1.0]).unwrap();

        let m = 0.1_f32;
        let v = 0.99_f32 * 1e-6 + 0.01;
        assert_eq!(x, [0.01 * m / (v.sqrt() + 1e-3)]);
        assert_eq!(opt.state().v, Some(&[v][..]));
    }

    #[test]
    fn fresh_state_is_zero_m_and_tau_squared_v() {
        let opt = ServerOptimizer::new(Rule::Yogi(Adaptive::default()), 2).unwrap();

        let state = opt.state();

        assert_eq!(state.m, Some(&[0.0_f32; 2][..]));
        assert_eq!(state.v, Some(&[1e-6_f32; 2][..]));
    }

    #[test]
    fn yogi_leaves_v_alone_when_it_equals_the_squared_delta() {
        let rule = Rule::Yogi(Adaptive::default());
        let mut opt = ServerOptimizer::new(rule, 1).unwrap();
        opt.load_state(State {
            steps: 0,
            m: Some(&[0.0]),
            v: Some(&[0.25]),
        })
        .unwrap();

        opt.step(&mut [0.0], &[0.5]).unwrap();

        // sign(v − d²) = sign(0) = 0 (f32::signum would say 1 and shrink v).
        assert_eq!(opt.state().v, Some(&[0.25_f32][..]));
    }

    #[test]
    fn errors_leave_model_and_state_unchanged() {
        let len = PARALLEL_MIN + 7;
        let mut opt = ServerOptimizer::new(adam(), len).unwrap();
        let mut x = values(len, 1, 1.0);
        opt.step(&mut x, &values(len, 2, 1.0)).unwrap();
        let (before, x_before) = (opt.clone(), x.clone());
        let mut poisoned = values(len, 3, 1.0);
        poisoned[len - 2] = f32::NAN;
        poisoned[len - 1] = f32::INFINITY;
        let mut huge = values(len, 4, 1.0);
        huge[PARALLEL_MIN + 1] = f32::MAX;

        let errors = [
            opt.step(&mut x, &poisoned).unwrap_err(),
            opt.step(&mut x, &huge).unwrap_err(),
            opt.step(&mut x[1..], &poisoned[1..]).unwrap_err(),
            opt.step(&mut x, &poisoned[1..]).unwrap_err(),
        ];

        assert_eq!((opt, x), (before, x_before));
        assert_eq!(errors[0], OptimError::NonFiniteDelta { index: len - 2 });
        // d² overflows float32, so would v.
        assert_eq!(
            errors[1],
            OptimError::NonFiniteResult {
                index: PARALLEL_MIN + 1
            }
        );
        assert!(matches!(
            errors[2],
            OptimError::LengthMismatch { what: "params", .. }
        ));
        assert!(matches!(
            errors[3],
            OptimError::LengthMismatch { what: "delta", .. }
        ));
    }

    #[test]
    fn a_model_overflow_is_an_error_too() {
        let mut opt = ServerOptimizer::new(Rule::Sgd { lr: 1e30 }, 2).unwrap();
        let mut x = [0.0_f32, 0.0];

        let result = opt.step(&mut x, &[0.0, 1e10]);

        assert_eq!(result, Err(OptimError::NonFiniteResult { index: 1 }));
        assert_eq!((x, opt.steps()), ([0.0, 0.0], 0));
    }

    #[test]
    fn load_state_then_step_equals_continuing() {
        let len = 50;
        let (d1, d2) = (values(len, 5, 1.0), values(len, 6, 1.0));
        let mut original = ServerOptimizer::new(adam(), len).unwrap();
        let mut x = values(len, 7, 1.0);
        original.step(&mut x, &d1).unwrap();
        let (m, v) = (
            original.state().m.unwrap().to_vec(),
            original.state().v.unwrap().to_vec(),
        );
        let mut restored = ServerOptimizer::new(adam(), len).unwrap();
        restored
            .load_state(State {
                steps: 1,
                m: Some(&m),
                v: Some(&v),
            })
            .unwrap();
        let mut y = x.clone();

        original.step(&mut x, &d2).unwrap();
        restored.step(&mut y, &d2).unwrap();

        assert_eq!(x, y);
        assert_eq!(original, restored);
    }

    #[test]
    fn load_state_validates_and_changes_nothing_on_error() {
        let mut opt = ServerOptimizer::new(adam(), 3).unwrap();
        opt.step(&mut [0.0; 3], &[1.0, 2.0, 3.0]).unwrap();
        let before = opt.clone();
        let ok = [0.5_f32; 3];
        let state = |m: Option<&'static [f32]>, v: Option<&'static [f32]>| State { steps: 9, m, v };

        let errors = [
            opt.load_state(state(Some(&[0.5; 3]), None)).unwrap_err(),
            opt.load_state(state(Some(&[0.5; 2]), Some(&[0.5; 3])))
                .unwrap_err(),
            opt.load_state(state(Some(&[0.5, f32::NAN, 0.5]), Some(&[0.5; 3])))
                .unwrap_err(),
            opt.load_state(state(Some(&[0.5; 3]), Some(&[0.5, 0.5, -1.0])))
                .unwrap_err(),
            opt.load_state(state(Some(&[0.5; 3]), Some(&[f32::NAN; 3])))
                .unwrap_err(),
        ];
        let mut sgd = ServerOptimizer::new(Rule::Sgd { lr: 1.0 }, 3).unwrap();
        let unexpected = sgd
            .load_state(State {
                steps: 0,
                m: Some(&ok),
                v: None,
            })
            .unwrap_err();

        assert_eq!(opt, before);
        assert_eq!(errors[0].to_string(), "fedadam state needs 'v'");
        assert_eq!(errors[1].to_string(), "m has 2 values, optimizer expects 3");
        assert_eq!(
            errors[2].to_string(),
            "state 'm' has an invalid value at index 1 (must be finite)"
        );
        assert_eq!(
            errors[3].to_string(),
            "state 'v' has an invalid value at index 2 (must be finite and >= 0)"
        );
        assert!(matches!(
            errors[4],
            OptimError::InvalidState {
                name: "v",
                index: 0,
                ..
            }
        ));
        assert_eq!(unexpected.to_string(), "fedavg has no 'm' state");
    }

    #[test]
    fn invalid_rules_are_rejected_by_new() {
        let rule = Rule::Adam(Adaptive {
            tau: 0.0,
            ..Adaptive::default()
        });

        assert!(matches!(
            ServerOptimizer::new(rule, 1),
            Err(OptimError::InvalidHyperparameter { name: "tau", .. })
        ));
    }

    fn rules() -> impl Strategy<Value = Rule> {
        let adaptive = (
            1e-3_f64..2.0,
            0.0_f64..0.999,
            0.0_f64..0.999,
            1e-6_f64..1e-1,
        )
            .prop_map(|(lr, beta1, beta2, tau)| Adaptive {
                lr,
                beta1,
                beta2,
                tau,
            });
        prop_oneof![
            (1e-3_f64..4.0).prop_map(|lr| Rule::Sgd { lr }),
            (1e-3_f64..4.0, 0.0_f64..0.999).prop_map(|(lr, beta)| Rule::Momentum { lr, beta }),
            adaptive.clone().prop_map(Rule::Adagrad),
            adaptive.clone().prop_map(Rule::Adam),
            adaptive.prop_map(Rule::Yogi),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn steps_match_the_reference_loop(
            rule in rules(),
            len in prop_oneof![0_usize..200, PARALLEL_MIN - 2..PARALLEL_MIN + 2 * CHUNK],
            steps in 1_usize..4,
            scale in prop_oneof![Just(1e-4_f32), Just(1.0_f32), Just(1e3_f32)],
            seed in any::<u64>(),
        ) {
            let mut opt = ServerOptimizer::new(rule, len).unwrap();
            let mut x = values(len, seed, 1.0);
            let mut expected = x.clone();
            let mut m = vec![0.0_f32; len];
            let mut v = match rule {
                Rule::Adagrad(a) | Rule::Adam(a) | Rule::Yogi(a) => {
                    vec![(a.tau * a.tau) as f32; len]
                }
                _ => vec![0.0; len],
            };

            for step in 0..steps {
                let d = values(len, seed ^ (step as u64 + 1) << 32, scale);
                opt.step(&mut x, &d).unwrap();
                reference_step(rule, &mut expected, &mut m, &mut v, &d);
            }

            prop_assert_eq!(&x, &expected);
            prop_assert_eq!(opt.steps(), steps as u64);
            let state = opt.state();
            prop_assert_eq!(state.m.unwrap_or(&m), &m[..]);
            prop_assert_eq!(state.v.unwrap_or(&v), &v[..]);
        }

        #[test]
        fn a_non_finite_delta_anywhere_is_found(
            rule in rules(),
            len in 1_usize..PARALLEL_MIN + 2 * CHUNK,
            at in any::<prop::sample::Index>(),
            bad in prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        ) {
            let mut opt = ServerOptimizer::new(rule, len).unwrap();
            let before = opt.clone();
            let mut x = values(len, 3, 1.0);
            let x_before = x.clone();
            let mut d = values(len, 4, 1.0);
            let index = at.index(len);
            d[index] = bad;

            let result = opt.step(&mut x, &d);

            prop_assert_eq!(result, Err(OptimError::NonFiniteDelta { index }));
            prop_assert_eq!(opt, before);
            prop_assert_eq!(x, x_before);
        }
    }
}
