"""A `Learner` for PyTorch: federates the floating tensors of an `nn.Module`'s `state_dict`.

    from metis_async.client.torch import TorchLearner

    learner = TorchLearner(model, train_loader, loss_fn=nn.CrossEntropyLoss(), eval_data=val_loader)
    run_learner("127.0.0.1:50051", learner)

Only this module imports torch; `import metis_async.client` does not.

What is federated: the `state_dict` entries of a floating dtype, in `state_dict` order: weights,
biases, and floating buffers such as BatchNorm's `running_mean` and `running_var` (so the
federation averages those statistics too). Integer buffers, like BatchNorm's
`num_batches_tracked`, are not: the wire carries floating tensors only, and a count of local
batches means nothing averaged, so they stay local and keep counting on each learner. Buffers
registered with `persistent=False` are not in the `state_dict` and stay local as well.

Copies: on a CPU model, `get_parameters` returns numpy views of the tensors
(`tensor.detach().cpu().numpy()` shares memory), so they change when the model trains; copy them
to keep them (the run loop flattens them into its upload buffer at once). A model on an
accelerator comes back as host copies, and bfloat16 tensors as float32 copies (numpy has no
bfloat16). `set_parameters` copies each array into the existing tensor in place
(`torch.from_numpy(array)` then `copy_` under `torch.no_grad()`): one copy, straight to the
model's device and dtype, and every tensor keeps its storage, so optimizers and views that refer
to it stay valid.

Training: by default `fit` runs its own loop (a fresh optimizer per task with
`FitConfig.learning_rate`, the DataLoader's batches, FedProx when `proximal_mu` > 0); pass
`train_fn` to train your own way instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import numpy.typing as npt
import torch  # type: ignore[import-not-found, unused-ignore]
from torch import nn  # type: ignore[import-not-found, unused-ignore]

from metis_async.client.learner import (
    EvaluateConfig,
    EvaluateRes,
    FitConfig,
    FitRes,
    Learner,
    Metrics,
    NDArrays,
)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
"""Re-iterable `(inputs, targets)` minibatches, such as a `torch.utils.data.DataLoader`."""

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss(outputs, targets)`: the mean loss over a batch (a scalar tensor)."""

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
"""`make(parameters, learning_rate)`: the optimizer of one task (`torch.optim.SGD` by default)."""

TrainFunction = Callable[[nn.Module, FitConfig], Mapping[str, float]]
"""`train(model, config)`: train `model` in place from the global parameters already loaded in
it; return metrics, with the local steps run as `"steps"` (partial work under a time budget)."""


def _sgd(parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=learning_rate)


class TorchLearner(Learner):
    """A learner that trains a PyTorch module on local data (see the module docstring).

    Args:
        model: the module; its parameters' device is where training runs.
        train_data: the local training batches (a DataLoader: its batch size and shuffling
            apply; `FitConfig.batch_size` does not).
        loss_fn: mean loss over a batch; `nn.CrossEntropyLoss()` by default.
        optimizer: builds each task's optimizer from the trainable parameters and
            `FitConfig.learning_rate`; plain SGD by default. A fresh one per task: optimizer
            state (momentum) is local to a task, as the global model changes between tasks.
        train_fn: replaces the built-in loop (then `optimizer` and FedProx are its business).
        eval_data: the batches `evaluate` scores; None scores `train_data`.
        num_examples: local training examples, reported for weighting; None counts
            `len(train_data.dataset)`.

    Raises:
        ValueError: when `num_examples` is None and `train_data` has no sized `dataset`, or the
            model has no floating tensors to federate.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Batches,
        *,
        loss_fn: LossFunction | None = None,
        optimizer: OptimizerFactory | None = None,
        train_fn: TrainFunction | None = None,
        eval_data: Batches | None = None,
        num_examples: int | None = None,
    ) -> None:
        self.model = model
        self._train_data = train_data
        self._eval_data = eval_data
        self._loss_fn: LossFunction = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self._optimizer = optimizer if optimizer is not None else _sgd
        self._train_fn = train_fn
        if num_examples is None:
            dataset = getattr(train_data, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError("give num_examples: train_data has no sized `dataset`")
            num_examples = len(dataset)
        self._num_examples = int(num_examples)
        self.keys = [k for k, t in model.state_dict().items() if t.is_floating_point()]
        """The `state_dict` keys that are federated, in the order of the parameter arrays."""
        if not self.keys:
            raise ValueError("the model has no floating tensors to federate")
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        self._device = first.device if first is not None else torch.device("cpu")

    def get_parameters(self) -> NDArrays:
        """Return the federated tensors as numpy arrays (views on a CPU model; see the module)."""
        state = self.model.state_dict()
        return [_as_numpy(state[key]) for key in self.keys]

    def set_parameters(self, parameters: NDArrays) -> None:
        """Copy `parameters` into the model's tensors in place, casting to their dtypes.

        Raises:
            ValueError: unless there is one array per key in `keys`, each of its tensor's shape.
        """
        if len(parameters) != len(self.keys):
            raise ValueError(f"expected {len(self.keys)} arrays, got {len(parameters)}")
        state = self.model.state_dict()
        with torch.no_grad():
            for key, array in zip(self.keys, parameters, strict=True):
                target = state[key]
                if tuple(array.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{key}: expected shape {tuple(target.shape)}, got {tuple(array.shape)}"
                    )
                # from_numpy shares the array's memory; it needs a writable, native-order one
                source = np.require(array, requirements=["W"])
                target.copy_(torch.from_numpy(source))

    def fit(self, parameters: NDArrays, config: FitConfig) -> FitRes:
        """Load `parameters`, train, and return the trained tensors, examples and metrics.

        The built-in loop runs `config.local_steps` batches (cycling through `train_data`), or
        `config.epochs` passes when `local_steps` is 0, stopping early once
        `config.time_budget_seconds` have passed; with `config.proximal_mu` > 0 it adds the
        FedProx term mu/2 * ||w - w_global||^2 over the trainable parameters. Metrics:
        `"loss"`, the mean training loss over the steps run (without the proximal term), and
        `"steps"`.
        """
        self.set_parameters(parameters)
        self.model.train()
        if self._train_fn is not None:
            metrics: Metrics = dict(self._train_fn(self.model, config))
        else:
            metrics = self._train(config)
        return FitRes(self.get_parameters(), self._num_examples, metrics)

    def _train(self, config: FitConfig) -> dict[str, float]:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self._optimizer(trainable, config.learning_rate)
        mu = config.proximal_mu
        anchor = [p.detach().clone() for p in trainable] if mu > 0 else []
        stop_at = time.perf_counter() + config.time_budget_seconds
        total = torch.zeros((), device=self._device)
        done = 0
        for inputs, targets in self._batches(config):
            if config.time_budget_seconds > 0 and done and time.perf_counter() >= stop_at:
                break
            optimizer.zero_grad()
            outputs = self.model(inputs.to(self._device))
            loss = self._loss_fn(outputs, targets.to(self._device))
            objective = loss
            if anchor:
                distance = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
                objective = loss + 0.5 * mu * distance
            torch.autograd.backward(objective)  # Tensor.backward is untyped
            optimizer.step()
            total += loss.detach()  # summed on the device: one host sync at the end
            done += 1
        mean = float(total.item()) / done if done else 0.0
        return {"loss": mean, "steps": float(done)}

    def _batches(self, config: FitConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if config.local_steps > 0:
            yield from itertools.islice(_cycle(self._train_data), config.local_steps)
        else:
            for _ in range(config.epochs):
                yield from self._train_data

    def evaluate(self, parameters: NDArrays, config: EvaluateConfig) -> EvaluateRes:
        """Score `parameters` on `eval_data` (or the training data): mean loss and accuracy.

        The loss is `loss_fn` averaged over examples. `{"accuracy": ...}` (fraction of argmax
        predictions equal to the target) is reported when outputs are (batch, classes) scores
        and targets integer class indices; other models get no metrics.
        """
        self.set_parameters(parameters)
        self.model.eval()
        data = self._eval_data if self._eval_data is not None else self._train_data
        loss_sum = torch.zeros((), device=self._device, dtype=torch.float64)
        correct = torch.zeros((), device=self._device, dtype=torch.int64)
        count = 0
        classifies = True
        with torch.no_grad():
            for inputs, targets in data:
                targets = targets.to(self._device)
                outputs = self.model(inputs.to(self._device))
                n = int(targets.shape[0])
                loss_sum += self._loss_fn(outputs, targets).double() * n
                classifies = classifies and outputs.ndim == 2 and not targets.is_floating_point()
                if classifies:
                    correct += (outputs.argmax(dim=1) == targets).sum()
                count += n
        if count == 0:
            raise ValueError("no examples to evaluate")
        metrics = {"accuracy": int(correct.item()) / count} if classifies else {}
        return EvaluateRes(float(loss_sum.item()) / count, count, metrics)

    def num_examples(self) -> int:
        """Return the number of local training examples."""
        return self._num_examples


def _as_numpy(tensor: torch.Tensor) -> npt.NDArray[np.generic]:
    """The tensor as a numpy array: a view for CPU tensors numpy can represent, else a copy."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    array: npt.NDArray[np.generic] = tensor.cpu().numpy()
    return array


def _cycle(batches: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pass over `batches` again and again (a DataLoader reshuffles each pass); stop if empty."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            return
