"""The `metis-async` command: `serve`, `config`, `learner`, `keys`, `demo`, `export-fhe`.

`serve` takes its settings from `--config FILE` (TOML), `METIS_ASYNC_<SECTION>__<KEY>`
environment variables and flags, in rising precedence; the flags are generated from the schema in
`metis_async.config`. `metis-async COMMAND --help` lists every setting with its default.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import metis_async._startup  # noqa: F401  (first: a shorter start, see its docstring)
from metis_async import config as settings_schema
from metis_async.admin import commands as admin_commands
from metis_async.checkpoints import CheckpointError
from metis_async.examples.flags import add_partition_flags

POLICY_NAMES = ["synchronous", "semi_synchronous", "asynchronous", "buffered"]


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

    serve = sub.add_parser(
        "serve",
        help="run the controller",
        description="Run the controller. Precedence: defaults < --config file < environment "
        "(METIS_ASYNC_<SECTION>__<KEY>) < flags.",
    )
    serve.add_argument(
        "--config", metavar="TOML", help="settings file (see deploy/controller.toml)"
    )
    settings_schema.add_flags(serve)

    config = sub.add_parser("config", help="check or show a controller settings file")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="print each problem with its key and line; exit 0 and 'ok' if none"
    )
    check.add_argument("file", metavar="TOML")
    show = config_sub.add_parser(
        "show", help="print the effective settings (defaults, file, environment) as TOML"
    )
    show.add_argument("file", metavar="TOML", nargs="?")

    keys = sub.add_parser(
        "keys", help="create a CA, certificates, learner tokens and encryption keys"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    ca = keys_sub.add_parser("ca", help="a self-signed CA: DIR/ca.key, DIR/ca.crt")
    ca.add_argument("dir", metavar="DIR")
    server_cert = keys_sub.add_parser("server", help="DIR/server.key and .crt, signed by DIR's CA")
    server_cert.add_argument("dir", metavar="DIR")
    server_cert.add_argument("--host", action="append", required=True, help="DNS name or IP")
    learner_cert = keys_sub.add_parser("learner", help="a learner certificate (mTLS identity)")
    learner_cert.add_argument("dir", metavar="DIR")
    learner_cert.add_argument("learner_id", metavar="ID")
    admin_token = keys_sub.add_parser(
        "admin-token", help="a new admin token for the Admin service and dashboard (mode 0600)"
    )
    admin_token.add_argument("file", metavar="FILE")
    secret = keys_sub.add_parser("token-secret", help="a secret that signs learner tokens")
    secret.add_argument("file", metavar="FILE")
    token = keys_sub.add_parser("learner-token", help="print a signed token for learner ID")
    token.add_argument("learner_id", metavar="ID")
    token.add_argument("--secret", required=True, metavar="FILE", help="the token secret")
    token.add_argument("--days", type=float, default=365.0, help="validity (days)")
    he = keys_sub.add_parser(
        "he-init",
        help="a shared learner key pair for homomorphic aggregation: DIR/he-controller.json "
        "(settings only, for the controller), DIR/he-learner.key (secret, for learners), "
        "DIR/he-public.key",
    )
    he.add_argument("dir", metavar="DIR")
    he.add_argument("--clip", type=float, default=4.0, help="update values clipped to +-CLIP")
    he.add_argument("--scale-bits", type=int, default=16, help="fixed-point fractional bits")
    he.add_argument(
        "--max-total-weight",
        type=int,
        default=1 << 20,
        help="largest total integer weight of one aggregate (sizing is checked against it)",
    )

    committee_init = keys_sub.add_parser(
        "he-committee-init",
        help="step 1 of multiparty keys: DIR/he-committee.json with the settings, a fresh CRS "
        "and the committee size (public; every member gets a copy)",
    )
    committee_init.add_argument("dir", metavar="DIR")
    committee_init.add_argument("--parties", type=int, required=True, help="committee members")
    party = keys_sub.add_parser(
        "he-party",
        help="step 2, on each member's own machine: its secret share DIR/he-party-I.key (0600) "
        "and its public key share DIR/he-share-I.bin (sent to whoever runs step 3)",
    )
    party.add_argument("committee", metavar="COMMITTEE_FILE")
    party.add_argument("--index", type=int, required=True, help="this member's party index")
    party.add_argument("-o", "--out", default=".", metavar="DIR")
    collect = keys_sub.add_parser(
        "he-committee",
        help="step 3: the collective public key from every member's key share, written into "
        "COMMITTEE_FILE (for the controller and every learner)",
    )
    collect.add_argument("committee", metavar="COMMITTEE_FILE")
    collect.add_argument("shares", nargs="+", metavar="SHARE_FILE")

    learner = sub.add_parser("learner", help="run the built-in example learner (digits)")
    learner.add_argument("--address", default="127.0.0.1:50051")
    learner.add_argument("--learner-id", default="", help="stable identity (default: assigned)")
    learner.add_argument("--token", default="")
    learner.add_argument("--tls-ca", metavar="PEM", help="dial with TLS, trusting this CA")
    learner.add_argument("--tls-cert", metavar="PEM", help="learner certificate (mutual TLS)")
    learner.add_argument("--tls-key", metavar="PEM", help="its private key")
    learner.add_argument("--he-keys", metavar="FILE", help="he: the learner key file")
    learner.add_argument("--he-committee", metavar="FILE", help="he-multiparty: the committee file")
    learner.add_argument("--he-party", metavar="FILE", help="he-multiparty: a member's file")
    add_partition_flags(learner)
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
    demo.add_argument(
        "--plot",
        default="demo-compare.png",
        metavar="FILE",
        help="with --compare: write a PNG of test accuracy against wall-clock time per protocol "
        "(default: demo-compare.png in the current directory)",
    )
    demo.add_argument(
        "--codec",
        default="float32",
        choices=["float32", "float16", "bfloat16", "int8"],
        help="payload codec of uploads and downloads",
    )
    demo.add_argument(
        "--secure",
        default="none",
        choices=["none", "he", "he-multiparty", "secagg"],
        help="aggregate under encryption: he = BFV with a shared learner key pair, "
        "he-multiparty = BFV with the key in shares of a committee of learners, "
        "secagg = SecAgg+ masking (the controller learns only each round's sum)",
    )
    demo.add_argument("--save-model", default=None, help="write the final model (.npz)")
    demo.add_argument("--json", action="store_true", help="print one JSON object last")
    demo.add_argument("--no-progress", action="store_true")
    _add_log_flags(demo, default="warning")

    fhe = sub.add_parser(
        "export-fhe",
        help="compile the trained digits model for encrypted inference (concrete-ml, in its "
        "own virtual environment): OUT/client.zip, OUT/server.zip, OUT/manifest.json",
    )
    fhe.add_argument(
        "model", metavar="MODEL", help="the model: demo --save-model .npz, or a checkpoint-*.npz"
    )
    fhe.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    fhe.add_argument("--n-bits", type=int, default=8, help="quantization bits (inputs, weights)")
    fhe.add_argument(
        "--venv",
        metavar="DIR",
        help="the concrete-ml environment, created on first use (default: "
        "$METIS_ASYNC_CONCRETE_VENV, else ~/.cache/metis-async/concrete-venv)",
    )
    fhe.add_argument(
        "--check",
        type=int,
        default=0,
        metavar="N",
        help="then predict N held-out digits encrypted and compare with the clear model",
    )
    fhe.add_argument("--json", action="store_true", help="print one JSON object last")
    admin_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metis-async` command."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            return _config(args)
        if args.command == "learner":
            return _learner(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "export-fhe":
            return _export_fhe(args)
        if args.command in admin_commands.COMMANDS:
            return admin_commands.run(args)
        return _demo(args)
    except KeyboardInterrupt:
        return 130
    except ValueError as error:
        print(f"metis-async: error: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:  # the state directory is busy, unreadable or of another run
        print(f"metis-async: error: {error}", file=sys.stderr)
        return 1


def _export_fhe(args: argparse.Namespace) -> int:
    from metis_async.secure import inference

    def progress(line: str) -> None:
        print(f"metis-async: {line}", file=sys.stderr, flush=True)

    model = inference.load_model(args.model)
    result = inference.export_fhe(
        model, args.out, n_bits=args.n_bits, venv=args.venv, check=args.check, progress=progress
    )
    print(result.summary(), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.as_dict()))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from metis_async.server import Controller, run_event_loop, serve
    from metis_async.telemetry import configure_logging
    from metis_async.workers.hub import WorkerHub

    settings = settings_schema.load_settings(
        args.config, os.environ, settings_schema.flag_overrides(args)
    )
    for warning in settings.warnings():
        print(f"metis-async: warning: {warning}", file=sys.stderr)
    configure_logging(settings.log.level, settings.log.json_lines)
    initial = None
    if settings.model.init_model:
        with np.load(settings.model.init_model) as npz:
            initial = [npz[k] for k in sorted(npz.files, key=_npz_order)]
    workers = settings.worker_count()
    controller: Controller | WorkerHub
    if workers:
        controller = WorkerHub(
            settings.policy(),
            settings.controller_config(),
            workers=workers,
            initial_model=initial,
            aggregation=settings.aggregation_settings(),
            log_level=settings.log.level,
            json_logs=settings.log.json_lines,
        )
    else:
        controller = Controller(
            settings.policy(),
            settings.controller_config(),
            initial_model=initial,
            aggregation=settings.aggregation_settings(),
        )

    # The controller drops the initial arrays once it holds the model; so does this frame
    # (held for the whole run, it kept a model-sized copy: 4 MB of a 1M-parameter model).
    initial = None

    def reload() -> None:  # SIGHUP: what can change without a restart
        fresh = settings_schema.load_settings(
            args.config, os.environ, settings_schema.flag_overrides(args)
        )
        configure_logging(fresh.log.level, fresh.log.json_lines)
        controller.reload_credentials(fresh.controller_config())

    until_finished = bool(settings.protocol.rounds)
    admin = settings.admin_options()
    run_event_loop(serve(controller, until_finished=until_finished, reload=reload, admin=admin))
    if controller.failure is not None:
        print(f"metis-async: error: {controller.failure}", file=sys.stderr)
        return 1
    if settings.model.save_model and controller.store.ready:
        np.savez(settings.model.save_model, *controller.store.parameters())
    return 0


def _config(args: argparse.Namespace) -> int:
    import os

    if args.config_command == "show":
        print(settings_schema.load_settings(args.file, os.environ).to_toml(), end="")
        return 0
    problems, warnings = settings_schema.check_file(args.file, os.environ)
    for problem in problems:
        print(problem, file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}")
    if problems:
        print(f"{args.file}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print("ok")
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
    credentials = None
    if args.tls_ca or args.tls_cert:
        from metis_async.client import tls_credentials

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        credentials = tls_credentials(read(args.tls_ca), read(args.tls_cert), read(args.tls_key))
    from metis_async.secure.he import read_learner_keys
    from metis_async.secure.multiparty import read_committee_file, read_party_file

    summary = run_learner(
        args.address,
        learner,
        learner_id=args.learner_id,
        token=args.token,
        credentials=credentials,
        he_keys=read_learner_keys(args.he_keys) if args.he_keys else None,
        he_committee=read_committee_file(args.he_committee) if args.he_committee else None,
        he_party=read_party_file(args.he_party) if args.he_party else None,
    )
    print(json.dumps(summary.as_dict()))
    return 0


def _keys(args: argparse.Namespace) -> int:

    from metis_async import keys
    from metis_async.auth import issue_token, read_secret

    command = args.keys_command
    written: tuple[Path, ...]
    if command == "ca":
        written = keys.create_ca(args.dir)
    elif command == "server":
        written = keys.create_server_certificate(args.dir, args.host)
    elif command == "learner":
        written = keys.create_learner_certificate(args.dir, args.learner_id)
    elif command == "token-secret":
        written = (keys.create_token_secret(args.file),)
    elif command == "admin-token":
        written = (keys.create_admin_token(args.file),)
    elif command == "he-init":
        from metis_async.secure import HeSettings, create_he_keys

        settings = HeSettings(
            clip=args.clip, scale_bits=args.scale_bits, max_total_weight=args.max_total_weight
        )
        written = create_he_keys(args.dir, settings)
    elif command.startswith("he-"):
        written = _committee_keys(args)
    else:
        print(issue_token(read_secret(args.secret), args.learner_id, args.days * 86400.0))
        return 0
    for path in written:
        print(path)
    return 0


def _committee_keys(args: argparse.Namespace) -> tuple[Path, ...]:
    """`keys he-committee-init`, `he-party`, `he-committee`: multiparty keys in three steps,
    no secret leaving the member that made it."""

    from metis_async.secure import HeSettings
    from metis_async.secure import multiparty as mp

    if args.keys_command == "he-committee-init":
        if args.parties < 1:
            raise ValueError(f"--parties must be >= 1, got {args.parties}")
        committee = mp.Committee(HeSettings(), mp.new_crs(), args.parties)
        committee.smudging()  # refuses a committee the noise budget cannot serve
        out = Path(args.dir)
        out.mkdir(parents=True, exist_ok=True)
        return (mp.write_committee_file(out / mp.COMMITTEE_FILE, committee),)
    committee = mp.read_committee_file(args.committee)
    if args.keys_command == "he-party":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        secret = out / mp.party_file_name(args.index)
        share = mp.create_party_file(
            secret, committee.settings, args.index, committee.parties, committee.crs
        )
        share_path = out / f"he-share-{args.index}.bin"
        share_path.write_bytes(share)
        return secret, share_path
    shares = [Path(path).read_bytes() for path in args.shares]
    done = committee.with_public_key(shares)
    return (mp.write_committee_file(args.committee, done),)


def _demo(args: argparse.Namespace) -> int:
    try:
        from rich.console import Console

        from metis_async.demo import DemoOptions, compare_protocols, comparison_table, run_demo
    except ModuleNotFoundError as error:  # rich and scikit-learn come with the demo extra
        raise ValueError(f"the demo needs {error.name}: pip install 'metis-async[demo]'") from None

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
        codec=args.codec,
        secure=args.secure,
        save_model=args.save_model,
    )
    out = sys.stderr if args.json else sys.stdout
    if args.compare:
        try:  # before the runs, so a missing matplotlib fails fast
            from metis_async.demo_plot import plot_accuracy
        except ModuleNotFoundError as error:
            raise ValueError(
                f"the demo needs {error.name}: pip install 'metis-async[demo]'"
            ) from None
        results = compare_protocols(options)
        Console(file=out, width=max(100, Console(file=out).width)).print(comparison_table(results))
        slow = (
            f"{options.stragglers:.0%} stragglers {options.slowdown:g}× slower"
            if options.stragglers > 0
            else "no stragglers"
        )
        title = f"digits: {options.learners} learners, {slow}"
        print(f"wrote {plot_accuracy(results, args.plot, title)}", file=out)
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
