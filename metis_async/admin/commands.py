"""`metis-async status | learners | pause | resume | checkpoint | model get`: the operator's
commands, each one call to the controller's Admin service (`client.AdminClient`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the client (grpc, numpy) is imported by the commands that run, not by --help
    from metis_async.admin.client import AdminClient

COMMANDS = ("status", "learners", "pause", "resume", "checkpoint", "model")
"""The top-level commands this module adds."""


def _add_target(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("controller")
    group.add_argument(
        "--admin",
        metavar="HOST:PORT",
        help="the Admin service (default: $METIS_ASYNC_ADMIN, "
        "the --config file's [admin], else 127.0.0.1:50052)",
    )
    group.add_argument(
        "--token-file", metavar="FILE", help="admin token (default: $METIS_ASYNC_ADMIN_TOKEN_FILE)"
    )
    group.add_argument("--ca", metavar="PEM", help="CA of the controller's TLS certificate")
    group.add_argument(
        "--config", metavar="TOML", help="the controller's settings file: [admin] address, token"
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the admin commands to `metis-async`'s subcommands."""
    status = sub.add_parser("status", help="the controller's state, versions and learners")
    status.add_argument("--json", action="store_true", help="everything as one JSON object")
    _add_target(status)

    learners = sub.add_parser("learners", help="list, kick or revoke learners")
    what = learners.add_subparsers(dest="learners_command")
    listing = what.add_parser("list", help="one page of learners (the default)")
    for parser in (learners, listing):
        parser.add_argument(
            "--sort",
            default="",
            help="learner_id, last_seen_seconds, "
            "speed_examples_per_second, accepted, rejected, last_staleness",
        )
        parser.add_argument("--desc", action="store_true", help="largest first")
        parser.add_argument("--limit", type=int, default=50, help="rows (at most 500)")
        parser.add_argument("--offset", type=int, default=0)
        parser.add_argument("--json", action="store_true")
        _add_target(parser)
    for name, text in (
        ("kick", "end its stream now (it may reconnect)"),
        ("revoke", "refuse it from now on"),
    ):
        one = what.add_parser(name, help=text)
        one.add_argument("learner_id")
        one.add_argument("--reason", default="")
        _add_target(one)

    for name, text in (
        ("pause", "no new tasks and no commits until resume"),
        ("resume", "undo pause"),
    ):
        parser = sub.add_parser(name, help=text)
        parser.add_argument("--reason", default="")
        _add_target(parser)

    checkpoint = sub.add_parser("checkpoint", help="write a checkpoint of the current version")
    _add_target(checkpoint)

    model = sub.add_parser("model", help="fetch a committed model")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    get = model_sub.add_parser("get", help="write a model version to an .npz file")
    get.add_argument("--version", type=int, default=0, help="0: the current one")
    get.add_argument("-o", "--output", required=True, metavar="NPZ")
    _add_target(get)


def run(args: argparse.Namespace) -> int:
    """Run one admin command; 1 (with the reason on stderr) if the controller refused it."""
    from metis_async.admin.client import AdminClient, AdminError, resolve_target

    target = resolve_target(args.admin, args.token_file, args.ca, args.config, os.environ)
    try:
        with AdminClient(target) as client:
            return _run(client, args)
    except AdminError as error:
        print(f"metis-async: error: {error}", file=sys.stderr)
        return 1


def _run(client: AdminClient, args: argparse.Namespace) -> int:
    command = args.command
    if command == "status":
        return _status(client, args.json)
    if command == "learners":
        sub = args.learners_command or "list"
        if sub == "kick":
            print(client.kick(args.learner_id, args.reason))
        elif sub == "revoke":
            print(client.revoke(args.learner_id, args.reason))
        else:
            _learners(client, args)
        return 0
    if command in ("pause", "resume"):
        print(getattr(client, command)(args.reason))
        return 0
    if command == "checkpoint":
        reply = client.checkpoint()
        print(f"version {reply.version}: {reply.path}")
        return 0
    import numpy as np

    version, tensors = client.model(args.version)
    np.savez(args.output, *tensors)
    print(f"version {version}: {len(tensors)} tensors -> {args.output}")
    return 0


def _status(client: AdminClient, as_json: bool) -> int:
    status = client.status()
    summary = json.loads(status.summary_json or "{}")
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return 0
    rows = [
        ("run", status.run_id),
        ("protocol", status.protocol),
        ("state", status.state),
        ("version", str(status.version)),
        ("learners", f"{status.learners_connected} connected, {status.learners_needed} needed"),
        ("updates", f"{status.updates_accepted} accepted, {status.updates_rejected} rejected"),
        (
            "model",
            f"{status.model_parameters:,} parameters"
            + (" (encrypted)" if status.encrypted else ""),
        ),
        ("workers", str(status.workers)),
        ("uptime", f"{status.uptime_seconds:.0f} s"),
    ]
    print(_table(["", ""], rows, header=False))
    versions = summary.get("versions", [])[-10:]
    if versions:
        print()
        print(
            _table(
                ["version", "committed", "updates", "mean staleness"],
                [
                    (
                        str(v["version"]),
                        time.strftime("%H:%M:%S", time.localtime(v["time"])),
                        str(v["updates"]),
                        f"{v['mean_staleness']:.2f}",
                    )
                    for v in versions
                ],
            )
        )
    evaluations = summary.get("evaluations", [])[-5:]
    if evaluations:
        names = sorted({k for e in evaluations for k in e["metrics"]})
        print()
        print(
            _table(
                ["evaluated", "learners", *names],
                [
                    (
                        str(e["version"]),
                        str(e["learners"]),
                        *(f"{e['metrics'].get(n, float('nan')):.4f}" for n in names),
                    )
                    for e in evaluations
                ],
            )
        )
    page = client.learners(limit=20)
    if page.learners:
        print()
        print(_learner_table(page.learners, page.total))
    return 0


def _learners(client: AdminClient, args: argparse.Namespace) -> None:
    page = client.learners(args.offset, args.limit, args.sort, args.desc)
    if args.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(page, always_print_fields_with_no_presence=True)))
        return
    print(_learner_table(page.learners, page.total, page.offset))


def _learner_table(learners: Sequence[object], total: int, offset: int = 0) -> str:
    rows = []
    for r in learners:
        speed = getattr(r, "speed_examples_per_second", 0.0)
        staleness = getattr(r, "last_staleness", -1)
        rows.append(
            (
                str(getattr(r, "learner_id", "")),
                "yes" if getattr(r, "connected", False) else "no",
                f"{getattr(r, 'last_seen_seconds', 0.0):.1f}",
                f"{speed:.1f}" if speed else "-",
                str(getattr(r, "accepted", 0)),
                str(getattr(r, "rejected", 0)),
                str(staleness) if staleness >= 0 else "-",
                "benched" if getattr(r, "benched", False) else "",
            )
        )
    table = _table(
        [
            "learner",
            "connected",
            "seen (s ago)",
            "examples/s",
            "accepted",
            "rejected",
            "staleness",
            "",
        ],
        rows,
    )
    shown = f"{offset + 1}-{offset + len(rows)}" if rows else "none"
    return f"{table}\nlearners {shown} of {total}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], header: bool = True) -> str:
    cells = ([list(headers)] if header else []) + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)
