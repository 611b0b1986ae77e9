"""Server optimizers: FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021).

A server optimizer turns the aggregated server delta ``d`` (the weighted mean of ``xᵢ − x``,
already scaled) into the next model, keeping its moment vectors in Rust next to the model
(float32; 4 bytes per parameter for ``fedavgm``, 8 for the adaptive kinds)::

    opt = make_optimizer("fedadam", model.size, lr=0.03)
    opt.step(model, delta)  # model (float32) is updated in place, GIL released

``opt.state()`` and ``opt.load_state(...)`` export and restore the moments for checkpoints;
``opt.kind`` and ``opt.hyperparameters`` describe how to rebuild the optimizer. The update rules
and defaults are those of :class:`metis_async._core.ServerOptimizer`.
"""

from __future__ import annotations

from typing import Final

from metis_async._core import AggregationError, ServerOptimizer

__all__ = ["HYPERPARAMETERS", "AggregationError", "ServerOptimizer", "make_optimizer"]

HYPERPARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    "fedavg": ("lr",),
    "sgd": ("lr",),
    "fedavgm": ("lr", "momentum"),
    "fedadagrad": ("lr", "beta1", "tau"),
    "fedadam": ("lr", "beta1", "beta2", "tau"),
    "fedyogi": ("lr", "beta1", "beta2", "tau"),
}
"""The hyperparameters each optimizer takes, by name (``sgd`` is an alias of ``fedavg``).

Defaults: ``fedavg`` lr 1; ``fedavgm`` lr 1, momentum 0.9; adaptive kinds lr 0.01, beta1 0.9,
beta2 0.99, tau 1e-3."""


def make_optimizer(name: str, length: int, **hyper: float) -> ServerOptimizer:
    """A server optimizer called ``name`` for a flat model of ``length`` float32 parameters.

    Args:
        name: ``fedavg`` (or ``sgd``), ``fedavgm``, ``fedadagrad``, ``fedadam`` or ``fedyogi``.
        length: number of model parameters (the moment vectors have this many values).
        **hyper: the optimizer's hyperparameters (see :data:`HYPERPARAMETERS`); those left out
            take their defaults. ``lr`` and ``tau`` must be finite and > 0, ``momentum``,
            ``beta1`` and ``beta2`` in [0, 1).

    Raises:
        ValueError: an unknown name or a hyperparameter the optimizer does not take (listing
            the valid choices); :class:`AggregationError` (a ``ValueError``) for a value out of
            range.
    """
    takes = HYPERPARAMETERS.get(name)
    if takes is None:
        raise ValueError(
            f"unknown server optimizer {name!r}; choose one of {', '.join(HYPERPARAMETERS)}"
        )
    unknown = sorted(set(hyper) - set(takes))
    if unknown:
        raise ValueError(f"{name} does not take {', '.join(unknown)}; it takes {', '.join(takes)}")
    return ServerOptimizer(
        name,  # type: ignore[arg-type]  # checked against HYPERPARAMETERS above
        length,
        hyper.get("lr"),
        momentum=hyper.get("momentum"),
        beta1=hyper.get("beta1"),
        beta2=hyper.get("beta2"),
        tau=hyper.get("tau"),
    )
