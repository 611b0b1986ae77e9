"""`metis-async demo`: a real federation on one machine, out of the box.

Starts a controller in this process and N learner processes that dial it over gRPC on loopback.
The learners train multinomial logistic regression on scikit-learn's digits, split non-IID
(Dirichlet α), and the controller scores every new version on a held-out test set while a
progress bar shows it. The last line of `--json` output is one JSON object with the result.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import tempfile
import time
from dataclasses import dataclass, field, replace
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import numpy.typing as npt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metis_async import wire
from metis_async.client.encrypted import CommitteeEncryption, LearnerEncryption
from metis_async.examples import digits
from metis_async.federation import summarize_participation
from metis_async.profiles import DEMO_PROFILES, default_demo_settings
from metis_async.protocols import TrainSettings, make_policy
from metis_async.secure.aggregate import HomomorphicAggregation, split_version
from metis_async.secure.he import (
    create_he_keys,
    read_controller_file,
    read_learner_keys,
    read_public_file,
)
from metis_async.secure.multiparty import create_committee_files, read_committee_file
from metis_async.server import Controller, ControllerConfig, run_event_loop
from metis_async.telemetry import configure_logging

SECURE_MODES = ("none", "he", "he-multiparty", "secagg")
"""Encryption modes of `metis-async demo --secure`."""

COMMITTEE_SIZE = 3
"""Committee members (the first learners) of `--secure he-multiparty`."""

BASE_STEP_SECONDS = 0.005
"""Per-step delay of every learner when stragglers are simulated (seconds)."""


@dataclass(frozen=True)
class DemoOptions:
    """What `metis-async demo` runs (defaults from `metis_async.profiles`).

    Attributes:
        rounds: versions to commit; None uses the protocol's profile.
        codec: payload codec of uploads and downloads (float32, float16, bfloat16, int8).
        stragglers: fraction of learners made `slowdown` times slower; with any, every learner
            also sleeps `BASE_STEP_SECONDS` per SGD step, so speeds differ as on real devices.
        secure: "none"; "he": homomorphic aggregation with a shared learner key pair made
            for this run (the controller gets the settings only; the demo's scorer, like every
            learner, holds the key to read the encrypted versions); "he-multiparty": the first
            `COMMITTEE_SIZE` learners hold the key in shares and every version is decrypted
            with all their shares; "secagg": SecAgg+ masking, the controller learns only each
            round's sum.
        save_model: write the final model here (`numpy.savez`, the layout's tensors in order).
    """

    learners: int = 10
    protocol: str = "synchronous"
    rounds: int | None = None
    alpha: float = 0.5
    seed: int = 0
    local_steps: int = default_demo_settings().local_steps
    batch_size: int = default_demo_settings().batch_size
    learning_rate: float = default_demo_settings().learning_rate
    stragglers: float = 0.0
    slowdown: float = 10.0
    round_deadline_seconds: float = default_demo_settings().round_deadline_seconds
    host: str = "127.0.0.1"
    port: int = 0
    progress: bool = True
    log_level: str = "warning"
    codec: str = "float32"
    secure: str = "none"
    save_model: str | None = None

    def policy_settings(self) -> dict[str, object]:
        """Settings for `make_policy`: the protocol's profile plus these options."""
        if self.protocol not in DEMO_PROFILES:
            raise ValueError(
                f"unknown protocol {self.protocol!r}; choose from {sorted(DEMO_PROFILES)}"
            )
        settings = dict(DEMO_PROFILES[self.protocol])
        if self.rounds is not None:
            settings["rounds"] = self.rounds
        settings["min_learners"] = self.learners
        settings["seed"] = self.seed
        settings["train"] = TrainSettings(
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
        )
        if self.protocol in ("synchronous", "semi_synchronous"):
            settings["round_deadline_seconds"] = self.round_deadline_seconds
        return settings

    def step_delays(self) -> list[float]:
        """Per-step sleep of each learner (seconds): the stragglers are the last ones."""
        if self.stragglers <= 0:
            return [0.0] * self.learners
        slow = min(self.learners, math.ceil(self.stragglers * self.learners))
        fast = self.learners - slow
        return [BASE_STEP_SECONDS] * fast + [BASE_STEP_SECONDS * self.slowdown] * slow


@dataclass
class DemoResult:
    """Outcome of one demo run (the `--json` object).

    `accuracy_history` is the test accuracy of each scored version, in commit order, and
    `seconds_history` when each was scored (seconds since the run started, like `seconds_to_90`).
    """

    protocol: str
    learners: int
    versions: int
    final_accuracy: float
    wall_seconds: float
    seconds_to_90: float | None
    accuracy_history: list[float] = field(default_factory=list)
    seconds_history: list[float] = field(default_factory=list)  # when each accuracy was scored
    updates_accepted: int = 0
    learner_exit_codes: list[int | None] = field(default_factory=list)
    participation: dict[str, object] = field(default_factory=dict)  # who contributed how much

    def as_dict(self) -> dict[str, object]:
        """The result as a JSON-ready dict."""
        return dict(self.__dict__)


def _learner_process(
    address: str,
    index: int,
    features: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    seed: int,
    log_level: str,
    step_delay_seconds: float,
    keys: tuple[str | None, str | None, str | None] = (None, None, None),
) -> None:
    """Entry point of one learner process (spawned, so it starts clean)."""
    import logging

    from metis_async.client import Backoff, run_learner
    from metis_async.secure.he import read_learner_keys
    from metis_async.secure.multiparty import read_committee_file, read_party_file

    he_key_file, committee_file, party_file = keys

    logging.basicConfig(level=log_level.upper(), format=f"learner-{index} %(message)s")
    learner = digits.DigitsLearner(
        features, labels, seed=seed + index, step_delay_seconds=step_delay_seconds
    )
    run_learner(
        address,
        learner,
        learner_id=f"learner-{index}",
        seed=seed + index,
        backoff=Backoff(initial_seconds=0.1, max_seconds=2.0, max_attempts=30),
        he_keys=read_learner_keys(he_key_file) if he_key_file else None,
        he_committee=read_committee_file(committee_file) if committee_file else None,
        he_party=read_party_file(party_file) if party_file else None,
    )


def run_demo(options: DemoOptions) -> DemoResult:
    """Run the demo federation to completion and return its result."""
    if options.secure not in SECURE_MODES:
        raise ValueError(f"unknown secure mode {options.secure!r}; choose from {SECURE_MODES}")
    configure_logging(options.log_level)
    with tempfile.TemporaryDirectory(prefix="metis-demo-keys-") as keys:
        return run_event_loop(_run(options, Path(keys)))


@dataclass
class _SecureSetup:
    """What `--secure` gives the controller and each learner (key files by learner index)."""

    he: HomomorphicAggregation | None = None
    learner_key: Path | None = None  # he: the shared key pair, every learner
    committee: Path | None = None  # he-multiparty: the committee's public file, every learner
    parties: dict[int, Path] = field(default_factory=dict)  # he-multiparty: members' files

    def learner_files(self, index: int) -> tuple[str | None, str | None, str | None]:
        party = self.parties.get(index)
        return (
            str(self.learner_key) if self.learner_key else None,
            str(self.committee) if self.committee else None,
            str(party) if party else None,
        )


def _secure_setup(options: DemoOptions, keys: Path) -> _SecureSetup:
    """Keys for `options.secure`. The demo runs on one machine, so it makes every key here; in
    a deployment each committee member makes its own party file (`keys he-party`)."""
    rounds = options.protocol in ("synchronous", "semi_synchronous")
    if options.secure == "he":
        controller_file, learner_file, public_file = create_he_keys(keys)
        if rounds:
            settings, key_id = read_controller_file(controller_file)  # settings only: no key
            he = HomomorphicAggregation(settings, key_id)
        else:  # round-less: the public key encrypts the (public) first model once
            settings, key_id, public = read_public_file(public_file)
            he = HomomorphicAggregation(settings, key_id, public_key=public)
        return _SecureSetup(he, learner_key=learner_file)
    if options.secure == "he-multiparty":
        members = min(COMMITTEE_SIZE, options.learners)
        committee_file, *party_files = create_committee_files(keys, members)
        committee = read_committee_file(committee_file)
        ids = tuple(f"learner-{i}" for i in range(members))
        he = HomomorphicAggregation(
            committee.settings, committee.key_id, committee=ids, public_key=committee.public_key
        )
        return _SecureSetup(he, committee=committee_file, parties=dict(enumerate(party_files)))
    return _SecureSetup()


class _Scorer:
    """Reads each committed version as the demo's evaluator: plain arrays as they are; an
    encrypted version with the learners' key pair (he), or once the committee's decryption
    shares are out (he-multiparty: whoever holds all of them can read the version)."""

    def __init__(self, setup: _SecureSetup) -> None:
        self._keys = (
            LearnerEncryption(read_learner_keys(setup.learner_key)) if setup.learner_key else None
        )
        self._committee = (
            CommitteeEncryption(read_committee_file(setup.committee)) if setup.committee else None
        )
        self._layout = wire.make_layout(digits.initial_parameters())
        self.controller: Controller | None = None

    async def parameters(
        self, version: int, params: list[npt.NDArray[np.generic]]
    ) -> list[npt.NDArray[np.generic]] | None:
        """The version's arrays; None if its decryption shares did not come in time."""
        if params[0].dtype != np.uint8:
            return params
        values = wire.num_parameters(self._layout)
        if self._keys is not None:
            divisor, body = split_version(params[0], self._keys.settings.ciphertext_bytes)
            flat = self._keys.decrypt(body, values, divisor)
        else:
            assert self._committee is not None
            assert self.controller is not None
            divisor, body = split_version(params[0], self._committee.settings.ciphertext_bytes)
            relay = self.controller.relay
            assert relay is not None
            for _ in range(1000):  # up to 10 s: the members answer within one round trip
                shares = relay.shares_of(version)
                if shares is not None:
                    break
                await asyncio.sleep(0.01)
            else:
                return None
            flat = self._committee.combine(body, shares, values, divisor)
        return [np.array(a) for a in wire.unflatten(flat, self._layout)]


async def _run(options: DemoOptions, keys: Path) -> DemoResult:
    started = time.perf_counter()
    setup = _secure_setup(options, keys)
    scorer = _Scorer(setup)
    federation = digits.load_digits_federated(options.learners, options.alpha, options.seed)
    test_x, test_y = federation.test
    history: list[float] = []
    history_seconds: list[float] = []  # since `started`, one per `history` entry
    reached_90: list[float] = []
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not options.progress,
    )
    bar = progress.add_task(
        f"{options.protocol} · {options.learners} learners",
        total=None,
        status="starting learners",
    )

    scored: list[int] = []  # versions in `history`, in order

    async def on_commit(version: int, params: list[npt.NDArray[np.generic]]) -> None:
        readable = await scorer.parameters(version, params)
        if readable is None:
            return
        _, acc = digits.evaluate_global(readable, test_x, test_y)
        elapsed = time.perf_counter() - started
        history.append(acc)
        history_seconds.append(elapsed)
        scored.append(version)
        if acc >= 0.90 and not reached_90:
            reached_90.append(elapsed)
        progress.update(bar, completed=version, status=f"test accuracy {acc:.3f}")

    settings = options.policy_settings()
    policy = make_policy(options.protocol, **settings)
    progress.update(bar, total=int(str(settings["rounds"])))
    controller = Controller(
        policy,
        ControllerConfig(
            host=options.host,
            port=options.port,
            upload_codec=options.codec,
            download_codec=options.codec,
            he=setup.he,
            secagg=options.secure == "secagg",
        ),
        initial_model=digits.initial_parameters(),
        on_commit=on_commit,
    )
    scorer.controller = controller
    port = await controller.start()
    address = f"{options.host}:{port}"
    ctx = mp.get_context("spawn")  # grpc and fork do not mix
    processes: list[BaseProcess] = []
    delays = options.step_delays()
    for i, (x, y) in enumerate(federation.partitions):
        p = ctx.Process(
            target=_learner_process,
            name=f"learner-{i}",
            daemon=True,
            args=(
                address,
                i,
                x,
                y,
                options.seed,
                options.log_level,
                delays[i],
                setup.learner_files(i),
            ),
        )
        p.start()
        processes.append(p)
    with progress:
        try:
            await controller.wait_finished()
            # Commit hooks run in the background and skip superseded versions: score the final
            # model here so the result always describes the version the federation ended with.
            published = controller.store.published()
            last = await scorer.parameters(controller.version, published)
            if last is not None and (not scored or scored[-1] != controller.version):
                await on_commit(controller.version, last)
            if last is not None and options.save_model:
                np.savez(options.save_model, *last)
        finally:
            participation = await controller.participation()
            await controller.stop(grace_seconds=2.0)
            await asyncio.to_thread(_join_all, processes, 10.0)
    final = history[-1] if history else float("nan")
    return DemoResult(
        protocol=options.protocol,
        learners=options.learners,
        versions=controller.version,
        final_accuracy=round(final, 4),
        wall_seconds=round(time.perf_counter() - started, 2),
        seconds_to_90=round(reached_90[0], 2) if reached_90 else None,
        accuracy_history=[round(a, 4) for a in history],
        seconds_history=[round(t, 3) for t in history_seconds],
        updates_accepted=controller.stats.updates_accepted_total,
        learner_exit_codes=[p.exitcode for p in processes],
        participation=summarize_participation(participation),
    )


def _join_all(processes: list[BaseProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():  # only our own children, by handle
            p.terminate()
            p.join(2.0)


def compare_protocols(options: DemoOptions) -> list[DemoResult]:
    """Run the demo once per protocol with the same learners, data and stragglers."""
    return [run_demo(replace(options, protocol=name, rounds=None)) for name in DEMO_PROFILES]


def comparison_table(results: list[DemoResult]) -> Table:
    """A table of `compare_protocols` results, with time to 0.90 relative to synchronous."""
    table = Table(title="protocols on digits (same learners, same data)")
    for column in (
        "protocol",
        "versions",
        "updates",
        "final accuracy",
        "to 0.90 (s)",
        "vs sync",
        "wall (s)",
    ):
        table.add_column(column, justify="left" if column == "protocol" else "right")
    sync = next((r.seconds_to_90 for r in results if r.protocol == "synchronous"), None)
    for r in results:
        ratio = (
            f"{sync / r.seconds_to_90:.1f}× faster"
            if sync and r.seconds_to_90 and r.protocol != "synchronous"
            else ""
        )
        table.add_row(
            r.protocol,
            str(r.versions),
            str(r.updates_accepted),
            f"{r.final_accuracy:.3f}",
            "never" if r.seconds_to_90 is None else f"{r.seconds_to_90:.1f}",
            ratio,
            f"{r.wall_seconds:.1f}",
        )
    return table
