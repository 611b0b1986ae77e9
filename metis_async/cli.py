"""The `metis-async` command: `serve`, `learner`, `demo`.

Every setting is a flag with a sensible default; `metis-async COMMAND --help` lists them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from metis_async.aggregation.server_step import AggregationSettings

POLICY_NAMES = ["synchronous", "semi_synchronous", "asynchronous", "buffered"]


def _add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """Protocol flags; unset ones keep the protocol's own default (see `policy_settings`)."""
    g = parser.add_argument_group("protocol (all)")
    g.add_argument("--protocol", default="synchronous", choices=POLICY_NAMES)
    g.add_argument("--rounds", type=int, help="versions to commit; 0 = run forever")
    g.add_argument("--min-learners", type=int, help="connected learners needed to start")
    g.add_argument("--seed", type=int)
    s = parser.add_argument_group("synchronous and semi_synchronous")
    s.add_argument(
        "--learners-per-round",
        type=int,
        help="goal count of updates per round; 0 = every connected learner",
    )
    s.add_argument(
        "--over-selection", type=float, help="select this many times the goal (1.3 = 130%%)"
    )
    s.add_argument(
        "--round-deadline",
        type=float,
        metavar="SECONDS",
        dest="round_deadline_seconds",
        help="close a round this long after it starts (semi-sync: slack over the budget)",
    )
    s.add_argument(
        "--min-update-fraction",
        type=float,
        help="fraction of the goal needed to commit a round at its deadline",
    )
    s.add_argument("--weighting", choices=["examples", "steps", "uniform"])
    s.add_argument("--late-learners", choices=["drop", "accept_partial"])
    s.add_argument(
        "--evaluate-every", type=int, help="federated evaluation of every n-th version; 0 = never"
    )
    s.add_argument("--budget-factor", type=float, help="semi-sync λ: budget = λ × slowest epoch")
    s.add_argument("--max-local-steps", type=int, help="semi-sync cap on local steps")
    s.add_argument(
        "--measure-once",
        action="store_const",
        const=False,
        dest="recompute_every_round",
        help="semi-sync: measure learner speeds only once",
    )
    a = parser.add_argument_group("asynchronous and buffered")
    a.add_argument("--concurrency", type=int, help="learners training at once; 0 = all")
    a.add_argument("--max-staleness", type=int, help="reject older updates; 0 = no limit")
    a.add_argument("--staleness", help="constant | polynomial[:a] | hinge[:a[:b]] | inverse_sqrt")
    a.add_argument("--alpha", type=float, help="FedAsync mixing rate")
    a.add_argument("--buffer-size", type=int, help="FedBuff K")
    a.add_argument("--server-lr", type=float, dest="server_learning_rate", help="FedBuff η")
    o = parser.add_argument_group("server optimizer and robust aggregation")
    o.add_argument(
        "--optimizer",
        default="fedavg",
        choices=["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"],
    )
    o.add_argument("--optimizer-lr", type=float, help="server optimizer learning rate η")
    o.add_argument("--beta1", type=float, help="FedAdam/Yogi/Adagrad β1")
    o.add_argument("--beta2", type=float, help="FedAdam/Yogi β2")
    o.add_argument("--tau", type=float, help="adaptivity τ of FedAdam/Yogi/Adagrad")
    o.add_argument("--momentum", type=float, help="FedAvgM momentum β")
    o.add_argument(
        "--robust",
        choices=["median", "trimmed_mean", "krum", "multi_krum"],
        help="robust rule instead of the mean (keeps all updates of a version in memory)",
    )
    o.add_argument("--trim-beta", type=float, default=0.1, help="trimmed mean: β per side")
    o.add_argument("--byzantine", type=int, default=0, help="Krum: Byzantine learners f")
    o.add_argument("--clip-norm", type=float, default=0.0, help="clip updates to this L2 norm")
    t = parser.add_argument_group("local training (sent with every task)")
    t.add_argument("--local-steps", type=int, default=20)
    t.add_argument("--epochs", type=int, default=1, help="used when --local-steps is 0")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=0.1, help="local learning rate")
    t.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx mu; 0 = off")


POLICY_FLAGS = (
    "rounds",
    "min_learners",
    "seed",
    "learners_per_round",
    "over_selection",
    "round_deadline_seconds",
    "min_update_fraction",
    "weighting",
    "late_learners",
    "evaluate_every",
    "budget_factor",
    "max_local_steps",
    "recompute_every_round",
    "concurrency",
    "max_staleness",
    "staleness",
    "alpha",
    "buffer_size",
    "server_learning_rate",
)


def aggregation_settings(args: argparse.Namespace) -> AggregationSettings:
    """The server optimizer, robust rule and clipping the user chose."""
    from metis_async.aggregation.server_step import AggregationSettings

    options = {
        name: float(value)
        for name, value in (
            ("lr", args.optimizer_lr),
            ("beta1", args.beta1),
            ("beta2", args.beta2),
            ("tau", args.tau),
            ("momentum", args.momentum),
        )
        if value is not None
    }
    return AggregationSettings(
        optimizer=args.optimizer,
        optimizer_options=options,
        robust=args.robust,
        trim_beta=args.trim_beta,
        byzantine=args.byzantine,
        clip_norm=args.clip_norm,
    )


def policy_settings(args: argparse.Namespace) -> dict[str, object]:
    """The protocol settings the user gave (unset flags keep the protocol's defaults)."""
    from metis_async.protocols import StalenessFunction, TrainSettings

    settings: dict[str, object] = {
        name: getattr(args, name) for name in POLICY_FLAGS if getattr(args, name, None) is not None
    }
    if isinstance(settings.get("staleness"), str):
        settings["staleness"] = StalenessFunction.parse(str(settings["staleness"]))
    settings["train"] = TrainSettings(
        local_steps=args.local_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        proximal_mu=args.proximal_mu,
    )
    return settings


def _add_log_flags(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument(
        "--log-level", default=default, choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-json", action="store_true", help="JSON log lines")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `metis-async`."""
    from metis_async import __version__

    parser = argparse.ArgumentParser(prog="metis-async", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"metis-async {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the controller")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument(
        "--init-model",
        metavar="NPZ",
        help="first model as .npz (arr_0, arr_1, ...); default: ask a learner",
    )
    serve.add_argument("--save-model", metavar="NPZ", help="write the final model here")
    serve.add_argument("--heartbeat-interval", type=float, default=5.0, metavar="SECONDS")
    serve.add_argument("--heartbeat-timeout", type=float, default=30.0, metavar="SECONDS")
    _add_policy_flags(serve)
    _add_log_flags(serve)

    learner = sub.add_parser("learner", help="run the built-in example learner (digits)")
    learner.add_argument("--address", default="127.0.0.1:50051")
    learner.add_argument("--learner-id", default="", help="stable identity (default: assigned)")
    learner.add_argument("--token", default="")
    learner.add_argument("--index", type=int, default=0, help="which partition of the data")
    learner.add_argument(
        "--of",
        type=int,
        default=10,
        dest="num_learners",
        help="how many partitions the data is split into",
    )
    learner.add_argument("--alpha", type=float, default=0.5, help="Dirichlet non-IID-ness")
    learner.add_argument("--seed", type=int, default=0)
    learner.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sleep per SGD step, to play a slow device",
    )
    _add_log_flags(learner)

    demo = sub.add_parser("demo", help="train digits with a controller and N learner processes")
    demo.add_argument("--learners", type=int, default=10)
    demo.add_argument("--protocol", default="synchronous", choices=POLICY_NAMES)
    demo.add_argument("--rounds", type=int, default=None, help="default: the protocol's profile")
    demo.add_argument("--alpha", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--local-steps", type=int, default=None)
    demo.add_argument("--lr", type=float, default=None)
    demo.add_argument(
        "--stragglers", type=float, default=0.0, help="fraction of learners made slow (0.1)"
    )
    demo.add_argument("--slowdown", type=float, default=10.0, help="how much slower they are")
    demo.add_argument(
        "--compare", action="store_true", help="run every protocol and print a comparison table"
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object last")
    demo.add_argument("--no-progress", action="store_true")
    _add_log_flags(demo, default="warning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metis-async` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "learner":
            return _learner(args)
        return _demo(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as error:
        print(f"metis-async: error: {error}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from metis_async.protocols import make_policy
    from metis_async.server import Controller, ControllerConfig, run_event_loop, serve
    from metis_async.telemetry import configure_logging

    configure_logging(args.log_level, args.log_json)
    policy = make_policy(args.protocol, **policy_settings(args))
    initial = None
    if args.init_model:
        with np.load(args.init_model) as npz:
            initial = [npz[k] for k in sorted(npz.files, key=_npz_order)]
    config = ControllerConfig(
        host=args.host,
        port=args.port,
        heartbeat_interval_seconds=args.heartbeat_interval,
        heartbeat_timeout_seconds=args.heartbeat_timeout,
    )
    controller = Controller(
        policy, config, initial_model=initial, aggregation=aggregation_settings(args)
    )
    run_event_loop(serve(controller, until_finished=bool(args.rounds)))
    if args.save_model and controller.store.ready:
        np.savez(args.save_model, *controller.store.parameters())
    return 0


def _npz_order(key: str) -> tuple[int, str]:
    number = key.removeprefix("arr_")
    return (int(number), key) if number.isdigit() else (1 << 30, key)


def _learner(args: argparse.Namespace) -> int:
    import logging

    from metis_async.client import run_learner
    from metis_async.examples import digits

    logging.basicConfig(level=args.log_level.upper(), format="%(name)s %(message)s")
    federation = digits.load_digits_federated(args.num_learners, args.alpha, args.seed)
    if not 0 <= args.index < args.num_learners:
        raise ValueError(f"--index must be in [0, {args.num_learners}), got {args.index}")
    x, y = federation.partitions[args.index]
    learner = digits.DigitsLearner(
        x, y, seed=args.seed + args.index, step_delay_seconds=args.step_delay
    )
    summary = run_learner(args.address, learner, learner_id=args.learner_id, token=args.token)
    print(json.dumps(summary.__dict__))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from metis_async.demo import DemoOptions, compare_protocols, comparison_table, run_demo

    defaults = DemoOptions()
    options = DemoOptions(
        learners=args.learners,
        protocol=args.protocol,
        rounds=args.rounds,
        alpha=args.alpha,
        seed=args.seed,
        local_steps=args.local_steps if args.local_steps is not None else defaults.local_steps,
        learning_rate=args.lr if args.lr is not None else defaults.learning_rate,
        stragglers=args.stragglers,
        slowdown=args.slowdown,
        progress=not args.no_progress,
        log_level=args.log_level,
    )
    out = sys.stderr if args.json else sys.stdout
    if args.compare:
        results = compare_protocols(options)
        Console(file=out, width=max(100, Console(file=out).width)).print(comparison_table(results))
        if args.json:
            print(json.dumps({"comparison": [r.as_dict() for r in results]}))
        return 0
    result = run_demo(options)
    print(
        f"{result.protocol}: {result.learners} learners, {result.versions} versions, "
        f"test accuracy {result.final_accuracy:.3f} in {result.wall_seconds:.1f} s",
        file=out,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0 if result.final_accuracy == result.final_accuracy else 1


if __name__ == "__main__":
    raise SystemExit(main())
