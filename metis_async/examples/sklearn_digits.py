"""A scikit-learn learner for the digits: `SGDClassifier` (log-loss) federated by `SklearnLearner`.

Start a controller, then one learner per partition (here 2; see docs/writing-a-learner.md):

    metis-async serve --port 50051 --rounds 5 --min-learners 2 --local-steps 0 --epochs 1 --lr 0.5
    python -m metis_async.examples.sklearn_digits --server 127.0.0.1:50051 --index 0 --of 2

The controller takes its first model from a learner: zeros of the shapes `SklearnLearner` builds
from the 64 pixels and the 10 classes. Each task runs `--epochs` passes of `partial_fit` over
minibatches of `--batch-size` (the controller's settings).
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.linear_model import SGDClassifier

from metis_async.client.sklearn import SklearnLearner
from metis_async.examples import learner_command
from metis_async.examples.digits import NUM_CLASSES, Labels
from metis_async.examples.learner_command import Pixels


def make_learner(features: Pixels, labels: Labels, seed: int = 0) -> SklearnLearner:
    """A digits learner: logistic regression trained by SGD, over every digit class."""
    estimator = SGDClassifier(loss="log_loss", random_state=seed)
    return SklearnLearner(estimator, features, labels, classes=range(NUM_CLASSES), seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one scikit-learn digits learner (flags: `learner_command.parse_args`)."""
    args = learner_command.parse_args(__doc__.splitlines()[0], argv)
    features, labels = learner_command.digits_partition(args)
    learner = make_learner(features, labels, seed=args.seed + args.index)
    return learner_command.serve(learner, args)


if __name__ == "__main__":
    raise SystemExit(main())
