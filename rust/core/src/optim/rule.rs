//! Server update rules: their hyperparameters, defaults, names and valid ranges.

use super::{OptimError, Result};

/// Default hyperparameters (ALGORITHMS.md, "Server optimizers").
pub mod defaults {
    /// FedAvg and FedAvgM server learning rate η.
    pub const AVG_LR: f64 = 1.0;
    /// FedAvgM momentum β.
    pub const MOMENTUM: f64 = 0.9;
    /// FedAdagrad / FedAdam / FedYogi server learning rate η (papers use 0.01–0.03).
    pub const ADAPTIVE_LR: f64 = 0.01;
    /// First-moment decay β₁.
    pub const BETA1: f64 = 0.9;
    /// Second-moment decay β₂ (FedAdam, FedYogi).
    pub const BETA2: f64 = 0.99;
    /// Adaptivity τ: the floor of the denominator, and `v`'s initial value is τ².
    pub const TAU: f64 = 1e-3;
}

/// Hyperparameters of the adaptive rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    /// Server learning rate η.
    pub lr: f64,
    /// First-moment decay β₁.
    pub beta1: f64,
    /// Second-moment decay β₂ (ignored by Adagrad).
    pub beta2: f64,
    /// Adaptivity τ.
    pub tau: f64,
}

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            lr: defaults::ADAPTIVE_LR,
            beta1: defaults::BETA1,
            beta2: defaults::BETA2,
            tau: defaults::TAU,
        }
    }
}

/// A server update rule and its hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// FedAvg with a server learning rate: `x ← x + lr·d`.
    Sgd { lr: f64 },
    /// FedAvgM: `m ← beta·m + d; x ← x + lr·m`.
    Momentum { lr: f64, beta: f64 },
    /// FedAdagrad: `v ← v + d²`.
    Adagrad(Adaptive),
    /// FedAdam: `v ← β₂·v + (1 − β₂)·d²`.
    Adam(Adaptive),
    /// FedYogi: `v ← v − (1 − β₂)·d²·sign(v − d²)`.
    Yogi(Adaptive),
}

/// Hyperparameters as given by a caller who may leave any of them out (`None`: the default).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hyperparameters {
    pub lr: Option<f64>,
    pub momentum: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub tau: Option<f64>,
}

impl Rule {
    /// The rule called `kind` (`fedavg` or `sgd`, `fedavgm`, `fedadagrad`, `fedadam`, `fedyogi`)
    /// with `hyper` over the defaults. A hyperparameter the kind does not use is an error, not
    /// silently ignored; so is a value out of range (see [`validate`](Self::validate)).
    pub fn from_name(kind: &str, hyper: Hyperparameters) -> Result<Self> {
        let rule = match kind {
            "fedavg" | "sgd" => Self::Sgd {
                lr: hyper.lr.unwrap_or(defaults::AVG_LR),
            },
            "fedavgm" => Self::Momentum {
                lr: hyper.lr.unwrap_or(defaults::AVG_LR),
                beta: hyper.momentum.unwrap_or(defaults::MOMENTUM),
            },
            "fedadagrad" | "fedadam" | "fedyogi" => {
                let adaptive = Adaptive {
                    lr: hyper.lr.unwrap_or(defaults::ADAPTIVE_LR),
                    beta1: hyper.beta1.unwrap_or(defaults::BETA1),
                    // Adagrad has no β₂; keep the default so the field reads sensibly.
                    beta2: hyper.beta2.unwrap_or(defaults::BETA2),
                    tau: hyper.tau.unwrap_or(defaults::TAU),
                };
                match kind {
                    "fedadagrad" => Self::Adagrad(adaptive),
                    "fedadam" => Self::Adam(adaptive),
                    _ => Self::Yogi(adaptive),
                }
            }
            _ => return Err(OptimError::UnknownKind(kind.to_owned())),
        };
        let given = [
            ("momentum", hyper.momentum.is_some()),
            ("beta1", hyper.beta1.is_some()),
            ("beta2", hyper.beta2.is_some()),
            ("tau", hyper.tau.is_some()),
        ];
        let takes = rule.hyperparameter_names();
        if let Some(&(name, _)) = given
            .iter()
            .find(|(name, given)| *given && !takes.contains(name))
        {
            return Err(OptimError::UnusedHyperparameter {
                kind: rule.name(),
                name,
                takes: rule.hyperparameter_list(),
            });
        }
        rule.validate()?;
        Ok(rule)
    }

    /// The canonical kind name (`fedavg`, `fedavgm`, `fedadagrad`, `fedadam`, `fedyogi`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "fedavg",
            Self::Momentum { .. } => "fedavgm",
            Self::Adagrad(_) => "fedadagrad",
            Self::Adam(_) => "fedadam",
            Self::Yogi(_) => "fedyogi",
        }
    }

    /// The hyperparameters this rule uses, by name, in a stable order.
    pub fn hyperparameters(&self) -> Vec<(&'static str, f64)> {
        match *self {
            Self::Sgd { lr } => vec![("lr", lr)],
            Self::Momentum { lr, beta } => vec![("lr", lr), ("momentum", beta)],
            Self::Adagrad(a) => vec![("lr", a.lr), ("beta1", a.beta1), ("tau", a.tau)],
            Self::Adam(a) | Self::Yogi(a) => vec![
                ("lr", a.lr),
                ("beta1", a.beta1),
                ("beta2", a.beta2),
                ("tau", a.tau),
            ],
        }
    }

    fn hyperparameter_names(&self) -> Vec<&'static str> {
        self.hyperparameters()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    fn hyperparameter_list(&self) -> &'static str {
        match self {
            Self::Sgd { .. } => "lr",
            Self::Momentum { .. } => "lr, momentum",
            Self::Adagrad(_) => "lr, beta1, tau",
            Self::Adam(_) | Self::Yogi(_) => "lr, beta1, beta2, tau",
        }
    }

    /// Checks the ranges: `lr` and `tau` finite and > 0, `momentum`, `beta1`, `beta2` in [0, 1).
    pub fn validate(&self) -> Result<()> {
        for (name, value) in self.hyperparameters() {
            let (ok, expected) = match name {
                "lr" | "tau" => (value.is_finite() && value > 0.0, "finite and > 0"),
                _ => ((0.0..1.0).contains(&value), "in [0, 1)"),
            };
            if !ok {
                return Err(OptimError::InvalidHyperparameter {
                    name,
                    value,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// Whether the rule keeps a first moment `m`.
    pub fn has_m(&self) -> bool {
        !matches!(self, Self::Sgd { .. })
    }

    /// Whether the rule keeps a second moment `v`.
    pub fn has_v(&self) -> bool {
        matches!(self, Self::Adagrad(_) | Self::Adam(_) | Self::Yogi(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_name_applies_defaults_and_aliases() {
        let none = Hyperparameters::default();

        assert_eq!(
            Rule::from_name("sgd", none),
            Ok(Rule::Sgd {
                lr: defaults::AVG_LR
            })
        );
        assert_eq!(
            Rule::from_name("fedavg", none),
            Rule::from_name("sgd", none)
        );
        assert_eq!(
            Rule::from_name("fedavgm", none),
            Ok(Rule::Momentum { lr: 1.0, beta: 0.9 })
        );
        assert_eq!(
            Rule::from_name(
                "fedyogi",
                Hyperparameters {
                    lr: Some(0.03),
                    ..none
                }
            ),
            Ok(Rule::Yogi(Adaptive {
                lr: 0.03,
                ..Adaptive::default()
            }))
        );
        assert_eq!(
            Rule::from_name("fedadagrad", none).map(|r| r.name()),
            Ok("fedadagrad")
        );
    }

    #[test]
    fn from_name_rejects_unknown_kinds_and_unused_or_bad_hyperparameters() {
        let none = Hyperparameters::default();

        let unknown = Rule::from_name("adam", none).unwrap_err();
        let unused = Rule::from_name(
            "fedadagrad",
            Hyperparameters {
                beta2: Some(0.9),
                ..none
            },
        )
        .unwrap_err();
        let bad_lr = Rule::from_name(
            "fedadam",
            Hyperparameters {
                lr: Some(f64::NAN),
                ..none
            },
        )
        .unwrap_err();
        let bad_beta = Rule::from_name(
            "fedavgm",
            Hyperparameters {
                momentum: Some(1.0),
                ..none
            },
        )
        .unwrap_err();

        assert!(unknown
            .to_string()
            .starts_with("unknown server optimizer 'adam'"));
        assert_eq!(
            unused.to_string(),
            "fedadagrad does not take beta2; it takes lr, beta1, tau"
        );
        assert_eq!(bad_lr.to_string(), "lr must be finite and > 0, got nan");
        assert_eq!(bad_beta.to_string(), "momentum must be in [0, 1), got 1.0");
    }
}
