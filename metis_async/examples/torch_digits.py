"""A PyTorch learner for the digits: a small MLP (64-32-10) federated by `TorchLearner`.

Start a controller, then one learner per partition (see docs/writing-a-learner.md); the same
controller trains this example and the scikit-learn one:

    metis-async serve --port 50051 --rounds 5 --min-learners 2 --local-steps 0 --epochs 1 --lr 0.5
    python -m metis_async.examples.torch_digits --server 127.0.0.1:50051 --index 0 --of 2

Every learner seeds torch with `--seed`, so all build the same initial model; the controller
takes its first model from one of them. Each task runs `--epochs` passes of SGD with the
controller's `--lr` over minibatches of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # type: ignore[import-not-found, unused-ignore]
from torch import nn  # type: ignore[import-not-found, unused-ignore]
from torch.utils.data import DataLoader, TensorDataset  # type: ignore[import-not-found, unused-ignore]

from metis_async.client.torch import TorchLearner
from metis_async.examples import learner_command
from metis_async.examples.digits import NUM_CLASSES, Labels
from metis_async.examples.learner_command import PIXELS, Pixels

HIDDEN = 32
BATCH_SIZE = 32


def make_model(seed: int = 0) -> nn.Module:
    """The MLP, its initial weights drawn from `seed` (the same seed gives the same model)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, NUM_CLASSES))


def make_learner(features: Pixels, labels: Labels, seed: int = 0) -> TorchLearner:
    """A digits learner: the MLP on `features, labels`, cross-entropy, minibatches of 32.

    `seed` draws the initial model; the minibatch order is drawn from `seed` too.
    """
    model = make_model(seed)
    dataset = TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=order)
    return TorchLearner(model, loader, loss_fn=nn.CrossEntropyLoss())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one PyTorch digits learner (flags: `learner_command.parse_args`)."""
    args = learner_command.parse_args(__doc__.splitlines()[0], argv)
    features, labels = learner_command.digits_partition(args)
    return learner_command.serve(make_learner(features, labels, seed=args.seed), args)


if __name__ == "__main__":
    raise SystemExit(main())
