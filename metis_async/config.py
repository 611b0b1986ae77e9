"""One typed settings schema for the controller: TOML file, environment and flags derive from it.

`ControllerSettings` holds every controller, policy, training, aggregation, model and logging
setting. Its sections are the tables of the TOML file (`deploy/controller.toml` shows them all):

    [server]       host, port, heartbeats, limits, tokens_file  -> `ControllerConfig`
    [protocol]     name and that protocol's settings             -> `make_policy(name, ...)`
    [train]        local training sent with every task           -> `TrainSettings`
    [aggregation]  server optimizer and options, robust rule     -> `AggregationSettings`
    [model]        init_model, save_model (.npz paths)
    [secure]       homomorphic aggregation or SecAgg+
    [admin]        Admin service and dashboard (ports, token file)
    [log]          level, json

Sources, lowest precedence first: the schema's defaults < the TOML file (`serve --config FILE`)
< environment variables < `metis-async serve` flags.

- Environment: every key is `METIS_ASYNC_<SECTION>__<KEY>` in upper case, two underscores between
  section and key (`METIS_ASYNC_PROTOCOL__BUFFER_SIZE=5`, `METIS_ASYNC_LOG__JSON=true`). Values
  are parsed as the key's type; an empty value unsets an optional key. A variable of that shape
  that names no key is an error, so a typo is never silently ignored.
- Flags: each key is a flag `--key-name`, without a `_seconds` suffix (`--round-deadline
  SECONDS`), except the historical names `--protocol`, `--lr`, `--server-lr`, `--optimizer-lr`,
  `--measure-once` and `--log-level`/`--log-json` (see `Flag`).

Protocol keys left unset keep the protocol's own default (FedBuff weighs staleness by 1/√(1+τ),
FedAsync polynomially); a key the chosen protocol does not have is an error naming it, wherever
it came from. Every problem names its key and where the value came from (file and line, variable,
flag). Learner tokens are kept out of the controller file: `server.tokens_file` names a TOML file
of `learner_id = "token"` lines, which can be readable by the service alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from metis_async.auth import read_revoked, read_secret
from metis_async.protocols import POLICIES, Policy, StalenessFunction, TrainSettings, make_policy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from metis_async.admin.run import AdminOptions
    from metis_async.aggregation.server_step import AggregationSettings
    from metis_async.secure.aggregate import HomomorphicAggregation
    from metis_async.server import ControllerConfig

__all__ = [
    "ENV_PREFIX",
    "AggregationSection",
    "ConfigError",
    "ControllerSettings",
    "Flag",
    "LogSection",
    "ModelSection",
    "Problem",
    "ProtocolSection",
    "SecureSection",
    "ServerSection",
    "TrainSection",
    "add_flags",
    "check_file",
    "flag_overrides",
    "load_settings",
    "read_tokens",
]

ENV_PREFIX = "METIS_ASYNC_"
ProtocolName = Literal["synchronous", "semi_synchronous", "asynchronous", "buffered"]
Layer = dict[str, dict[str, object]]
"""Settings from one source: section -> key -> value."""


Codec = Literal["float32", "float16", "bfloat16", "int8"]


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the `serve` command line, where not the default `--key-name`.

    Attributes:
        name: the flag, e.g. `--lr`.
        const: for a boolean setting, the value the flag stores (it then takes no argument).
        metavar: the placeholder in `--help`.
    """

    name: str | None = None
    const: bool | None = None
    metavar: str | None = None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ServerSection(_Section):
    """`[server]`: network, liveness and limits of the controller (`ControllerConfig`)."""

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=50051, ge=0, le=65535, description="TCP port; 0 picks a free one")
    extra_hosts: Annotated[str, Flag(metavar="HOST,...")] = Field(
        default="", description="more addresses to listen on at the same port, comma-separated"
    )
    heartbeat_interval_seconds: float = Field(
        default=5.0, gt=0, description="learners send a heartbeat at least this often"
    )
    heartbeat_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a learner silent this long is disconnected, its tasks void"
    )
    hello_timeout_seconds: float = Field(
        default=10.0, gt=0, description="a new stream must say hello within this time"
    )
    drain_seconds: float = Field(
        default=30.0,
        gt=0,
        description="on stop or finish, seconds streams get to take their last messages "
        "(shutdown, final model); the stop ends sooner once every stream is done",
    )
    max_chunk_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="largest chunk either side may send"
    )
    download_chunk_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="chunk size of the models the controller sends (capped at max_chunk_bytes); "
        "gRPC buffers up to one chunk per stream outside download_buffer_bytes",
    )
    send_queue_limit: int = Field(
        default=1024,
        ge=1,
        description="messages queued per stream before a slow learner is dropped",
    )
    max_model_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="largest flat model a learner may propose or we hold"
    )
    max_learner_id_length: int = Field(
        default=128, ge=1, description="longest learner id accepted (UTF-8 bytes)"
    )
    max_num_examples: int = Field(
        default=10**9, ge=1, description="largest num_examples a learner may claim (its weight)"
    )
    initial_model_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="the learner asked for the first model may take this long before another is",
    )
    max_uploads_in_flight: int = Field(
        default=4,
        ge=1,
        description="fewest training uploads reassembled at once, whatever the buffer allows",
    )
    upload_buffer_bytes: int = Field(
        default=32 * 1024**2,
        ge=0,
        description="bytes of training uploads reassembled at once; more wait, unread",
    )
    download_buffer_bytes: int = Field(
        default=32 * 1024**2,
        ge=1,
        description="bytes of model chunks handed to gRPC for sending at once, per process; "
        "more wait in their streams' queues",
    )
    bundle_buffer_bytes: int = Field(
        default=128 * 1024**2,
        ge=1,
        description="bytes of bundles (a task with its small model) handed to gRPC for sending "
        "at once, per process; more wait in their streams' queues",
    )
    upload_grant_bytes: int = Field(
        default=1024 * 1024,
        ge=-1,
        description="learners announcing 'grant' send the chunks of models of at least this many "
        "bytes only when the controller has a slot for them; -1: never",
    )
    download_receipt_bytes: int = Field(
        default=1024 * 1024,
        ge=-1,
        description="models of at least this many bytes are paced by the receipts of learners "
        "announcing 'receipt' (sent chunks hold download_buffer_bytes until acknowledged); "
        "-1: never",
    )
    stream_window_bytes: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="fixed HTTP/2 receive window per learner stream (bounds gRPC's buffers of "
        "waiting uploads; caps a stream at window/RTT); 0: gRPC sizes it automatically",
    )
    read_buffer_bytes: int = Field(
        default=256 * 1024,
        ge=0,
        le=2**31 - 1,
        description="largest buffer gRPC reads one connection into; it keeps that buffer for "
        "the connection's life, grown to its largest burst (4 MB uploads: ~4 MB per learner); "
        "0: gRPC's own limit",
    )
    upload_codec: Codec = Field(
        default="float32",
        description="uploads of learners that offer it: float32, float16, bfloat16, int8",
    )
    download_codec: Codec = Field(
        default="float32",
        description="models sent to learners that offer it (float32 to the others)",
    )
    workers: Annotated[str, Flag(metavar="N|auto")] = Field(
        default="0",
        pattern=r"^(auto|\d+)$",
        description="ingest worker processes sharing the port (0: serve in one process)",
    )
    tokens_file: Annotated[str | None, Flag(metavar="TOML")] = Field(
        default=None,
        description='TOML file of learner_id = "token" lines; unset: no authentication',
    )
    state_dir: Annotated[str | None, Flag(metavar="DIR")] = Field(
        default=None,
        description="checkpoint every committed version here and resume from it; unset: none",
    )
    checkpoints_kept: int = Field(
        default=3, ge=1, description="newest checkpoints kept in state_dir"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics at http://metrics_host:PORT/metrics; unset: off",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address of the metrics endpoint")
    token_secret_file: Annotated[str | None, Flag(metavar="FILE")] = Field(
        default=None,
        description="secret (hex) that signs learner tokens (metis-async keys token-secret)",
    )
    revoked_file: Annotated[str | None, Flag(metavar="FILE")] = Field(
        default=None, description="revoked learner ids, one per line (re-read on SIGHUP)"
    )
    tls_cert_file: Annotated[str | None, Flag(metavar="PEM")] = Field(
        default=None, description="server certificate chain: the learners' port speaks TLS"
    )
    tls_key_file: Annotated[str | None, Flag(metavar="PEM")] = Field(
        default=None, description="private key of tls_cert_file"
    )
    tls_client_ca_file: Annotated[str | None, Flag(metavar="PEM")] = Field(
        default=None,
        description="CA of learner certificates: mutual TLS, certificate name = learner id",
    )
    max_learners: int = Field(
        default=0, ge=0, description="learners connected at once; more are refused; 0: no limit"
    )
    max_messages_per_second: float = Field(
        default=200.0,
        ge=0,
        description="a learner sending more (beyond message_burst) is cut off; 0: no limit",
    )
    message_burst: int = Field(
        default=2000, ge=1, description="messages a learner may send at once (one per chunk)"
    )
    max_learner_bytes_per_second: float = Field(
        default=0.0, ge=0, description="read each learner no faster than this; 0: no limit"
    )
    max_missed_tasks: int = Field(
        default=5,
        ge=0,
        description="tasks in a row a learner leaves unanswered before it is benched; 0: never",
    )
    bench_seconds: float = Field(
        default=300.0, gt=0, description="how long a benched learner gets no work"
    )
    insecure: Annotated[bool, Flag(const=True)] = Field(
        default=False,
        description="listen beyond loopback without TLS and learner credentials (not advised)",
    )

    @model_validator(mode="after")
    def _timeout_exceeds_interval(self) -> ServerSection:
        if self.heartbeat_timeout_seconds <= self.heartbeat_interval_seconds:
            raise PydanticCustomError(
                "heartbeat_timeout",
                "heartbeat_timeout_seconds ({timeout}) must exceed heartbeat_interval_seconds "
                "({interval})",
                {
                    "key": "server.heartbeat_timeout_seconds",
                    "timeout": self.heartbeat_timeout_seconds,
                    "interval": self.heartbeat_interval_seconds,
                },
            )
        return self


class ProtocolSection(_Section):
    """`[protocol]`: the protocol and its settings; unset keys keep the protocol's defaults."""

    name: Annotated[ProtocolName, Flag("--protocol")] = Field(
        default="synchronous", description="the federation protocol"
    )
    rounds: int | None = Field(default=None, description="versions to commit; 0 = run forever")
    min_learners: int | None = Field(default=None, description="connected learners needed to start")
    seed: int | None = Field(default=None, description="seed of the learner sampler")
    learners_per_round: int | None = Field(
        default=None, description="goal count of updates per round; 0 = every connected learner"
    )
    over_selection: float | None = Field(
        default=None, description="select this many times the goal (1.3 = 130%)"
    )
    round_deadline_seconds: float | None = Field(
        default=None, description="close a round this long after it starts (semi-sync: slack)"
    )
    min_update_fraction: float | None = Field(
        default=None, description="fraction of the goal needed to commit a round at its deadline"
    )
    weighting: Literal["examples", "steps", "uniform"] | None = Field(
        default=None, description="weight of an update: its examples, its steps, or uniform"
    )
    late_learners: Literal["drop", "accept_partial"] | None = Field(
        default=None, description="at the deadline: cancel late learners or take their partial work"
    )
    partial_budget_fraction: float | None = Field(
        default=None, description="accept_partial: task time budget as a fraction of the deadline"
    )
    evaluate_every: int | None = Field(
        default=None, description="federated evaluation of every n-th version; 0 = never"
    )
    budget_factor: float | None = Field(
        default=None, description="semi-sync λ: round budget = λ × slowest learner's epoch"
    )
    max_local_steps: int | None = Field(default=None, description="semi-sync cap on local steps")
    recompute_every_round: Annotated[bool | None, Flag("--measure-once", const=False)] = Field(
        default=None,
        description="semi-sync: re-measure speeds every round (flag: measure only once)",
    )
    probe_steps: int | None = Field(
        default=None, description="semi-sync: local steps of an unmeasured learner; 0 = an epoch"
    )
    concurrency: int | None = Field(default=None, description="learners training at once; 0 = all")
    max_staleness: int | None = Field(
        default=None, description="reject updates older than this; 0 = no limit"
    )
    staleness: str | None = Field(
        default=None, description="constant | polynomial[:a] | hinge[:a[:b]] | inverse_sqrt"
    )
    alpha: float | None = Field(default=None, description="FedAsync mixing rate α")
    buffer_size: int | None = Field(default=None, description="FedBuff K: updates per version")
    server_learning_rate: Annotated[float | None, Flag("--server-lr")] = Field(
        default=None, description="FedBuff η"
    )
    task_deadline_seconds: float | None = Field(
        default=None, description="cancel a task not reported this long after assignment"
    )
    normalize_weights: Annotated[bool | None, Flag(const=True)] = Field(
        default=None, description="FedBuff: divide the buffer by its total weight instead of K"
    )

    @model_validator(mode="after")
    def _settings_belong_to_the_protocol(self) -> ProtocolSection:
        known = protocol_keys(self.name)
        wrong = [k for k in type(self).model_fields if k != "name" and k not in known]
        wrong = [k for k in wrong if getattr(self, k) is not None]
        if wrong:
            raise PydanticCustomError(
                "setting_not_in_protocol",
                "protocol '{protocol}' has no setting {settings}; it has {known}",
                {
                    "protocol": self.name,
                    "settings": ", ".join(wrong),
                    "known": ", ".join(sorted(known)),
                    "keys": ",".join(f"protocol.{k}" for k in wrong),
                },
            )
        if self.staleness is not None:
            try:
                StalenessFunction.parse(self.staleness)
            except ValueError as error:
                raise PydanticCustomError(
                    "invalid_setting",
                    "{message}",
                    {"message": str(error), "key": "protocol.staleness"},
                ) from None
        return self


class TrainSection(_Section):
    """`[train]`: local training settings sent with every task (`TrainSettings`)."""

    local_steps: int = Field(default=20, ge=0, description="minibatch steps per task; 0 = epochs")
    epochs: int = Field(default=1, ge=1, description="full passes when local_steps is 0")
    batch_size: int = Field(default=32, ge=1, description="examples per minibatch")
    learning_rate: Annotated[float, Flag("--lr")] = Field(
        default=0.1, gt=0, allow_inf_nan=False, description="local learning rate"
    )
    proximal_mu: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="FedProx μ; 0 = off"
    )


class AggregationSection(_Section):
    """`[aggregation]`: server optimizer, robust rule and clipping (`AggregationSettings`)."""

    optimizer: Literal["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"] = Field(
        default="fedavg", description="server optimizer"
    )
    optimizer_lr: float | None = Field(default=None, description="server optimizer learning rate η")
    beta1: float | None = Field(default=None, description="FedAdam/Yogi/Adagrad β1")
    beta2: float | None = Field(default=None, description="FedAdam/Yogi β2")
    tau: float | None = Field(default=None, description="adaptivity τ of FedAdam/Yogi/Adagrad")
    momentum: float | None = Field(default=None, description="FedAvgM momentum β")
    robust: Literal["median", "trimmed_mean", "krum", "multi_krum"] | None = Field(
        default=None,
        description="robust rule instead of the mean (keeps a version's updates in memory)",
    )
    trim_beta: float = Field(default=0.1, description="trimmed mean: fraction dropped per side")
    byzantine: int = Field(default=0, description="Krum: Byzantine learners f")
    clip_norm: float = Field(default=0.0, description="clip updates to this L2 norm; 0 = off")
    fold_window: int = Field(default=8, description="accepted updates folded together in one pass")

    @model_validator(mode="after")
    def _settings_are_valid(self) -> AggregationSection:
        try:
            self.settings()
        except ValueError as error:
            raise _invalid("aggregation", str(error), type(self).model_fields) from None
        return self

    def options(self) -> dict[str, float]:
        """The optimizer hyperparameters that were set, by the optimizer's names."""
        names = {"optimizer_lr": "lr", "beta1": "beta1", "beta2": "beta2", "tau": "tau"}
        names["momentum"] = "momentum"
        return {o: float(v) for k, o in names.items() if (v := getattr(self, k)) is not None}

    def settings(self) -> AggregationSettings:
        """The `AggregationSettings` of this section (raises ValueError for bad values)."""
        from metis_async.aggregation.server_step import AggregationSettings

        return AggregationSettings(
            optimizer=self.optimizer,
            optimizer_options=self.options(),
            robust=self.robust,
            trim_beta=self.trim_beta,
            byzantine=self.byzantine,
            clip_norm=self.clip_norm,
            fold_window=self.fold_window,
        )


class ModelSection(_Section):
    """`[model]`: where the first model comes from and where the last goes (.npz files)."""

    init_model: Annotated[str | None, Flag(metavar="NPZ")] = Field(
        default=None, description="first model as .npz (arr_0, arr_1, ...); unset: ask a learner"
    )
    save_model: Annotated[str | None, Flag(metavar="NPZ")] = Field(
        default=None, description="write the final model here"
    )


class SecureSection(_Section):
    """`[secure]`: aggregation under homomorphic encryption (the controller holds no key)."""

    mode: Annotated[
        Literal["none", "he", "he-multiparty", "secagg"], Flag("--secure", metavar="MODE")
    ] = Field(
        default="none",
        description="none; he: one learner key pair (keys he-init); he-multiparty: the key in "
        "shares of a committee of learners (keys he-committee); secagg: SecAgg+ masking",
    )
    he_file: Annotated[str | None, Flag(metavar="FILE")] = Field(
        default=None,
        description="he: the controller's file of keys he-init (settings only); he-multiparty: "
        "the committee file of keys he-committee (public)",
    )
    committee: str = Field(
        default="",
        description="he-multiparty: the members' learner ids in party order, comma-separated",
    )
    weight_unit: float = Field(default=1.0, description="examples per unit of integer weight")
    max_update_weight: int = Field(default=1024, description="largest integer weight of an update")
    model_divisor: int = Field(
        default=4096,
        ge=1,
        description="he, buffered/asynchronous: mixing weights are multiples of 1/model_divisor "
        "(each version spends about model_divisor x its step of the noise budget)",
    )
    secagg_clip: float = Field(default=1.0, gt=0, description="secagg: deltas clipped to ±clip")
    secagg_step_timeout_seconds: float = Field(
        default=10.0, gt=0, description="secagg: how long each step of a round waits"
    )

    @model_validator(mode="after")
    def _complete(self) -> SecureSection:
        if self.mode in ("he", "he-multiparty") and not self.he_file:
            raise _invalid("secure", f"mode {self.mode} needs he_file", type(self).model_fields)
        if self.mode == "he-multiparty" and not self.members():
            raise _invalid("secure", "he-multiparty needs the committee", type(self).model_fields)
        return self

    def members(self) -> tuple[str, ...]:
        """The committee's learner ids, in party order."""
        return tuple(m.strip() for m in self.committee.split(",") if m.strip())

    def homomorphic(self) -> HomomorphicAggregation | None:
        """The controller's encryption settings, read from `he_file` (None: mode none)."""
        from metis_async.secure.aggregate import HomomorphicAggregation
        from metis_async.secure.he import PUBLIC_FILE, read_controller_file, read_public_file
        from metis_async.secure.multiparty import read_committee_file

        if self.mode in ("none", "secagg") or self.he_file is None:
            return None
        try:
            public = b""
            if self.mode == "he":
                if Path(self.he_file).name == PUBLIC_FILE:  # round-less policies need it
                    settings, key_id, public = read_public_file(self.he_file)
                else:
                    settings, key_id = read_controller_file(self.he_file)
                members: tuple[str, ...] = ()
            else:
                committee = read_committee_file(self.he_file)
                settings, key_id, members = committee.settings, committee.key_id, self.members()
                public = committee.public_key
                if len(members) != committee.parties:
                    raise ValueError(
                        f"committee lists {len(members)} learners; the committee file has "
                        f"{committee.parties} parties"
                    )
            return HomomorphicAggregation(
                settings,
                key_id,
                self.weight_unit,
                self.max_update_weight,
                members,
                public,
                self.model_divisor,
            )
        except ValueError as error:
            raise ConfigError([Problem("secure.he_file", str(error))]) from None


class AdminSection(_Section):
    """`[admin]`: the operator's Admin gRPC service and the dashboard (admin.proto)."""

    host: Annotated[str, Flag("--admin-host")] = Field(
        default="127.0.0.1", description="address of the Admin service and the dashboard"
    )
    port: Annotated[int | None, Flag("--admin-port")] = Field(
        default=None,
        ge=0,
        le=65535,
        description="Admin gRPC service port (metis-async status, learners, pause, ...); "
        "unset: off",
    )
    token_file: Annotated[str | None, Flag("--admin-token-file", metavar="FILE")] = Field(
        default=None,
        description="file holding the admin token (metis-async keys admin-token); unset: no "
        "token, loopback only",
    )
    dashboard_port: Annotated[int | None, Flag(metavar="PORT")] = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve the dashboard at http://admin.host:PORT/; unset: off",
    )
    dashboard_interval_seconds: float = Field(
        default=1.0, gt=0, le=60, description="how often the dashboard's numbers are refreshed"
    )

    @model_validator(mode="after")
    def _exposed_needs_token(self) -> AdminSection:
        on = self.port is not None or self.dashboard_port is not None
        if on and self.token_file is None and not _is_loopback(self.host):
            raise PydanticCustomError(
                "admin_token",
                "the Admin service and dashboard on {host}, beyond loopback, need an admin "
                "token (admin.token_file)",
                {"key": "admin.token_file", "host": self.host},
            )
        return self

    def token(self) -> str | None:
        """The admin token from `token_file` (None: no token)."""
        if self.token_file is None:
            return None
        return _read(self.token_file, "admin.token_file", read_admin_token)


def read_admin_token(path: str | Path) -> str:
    """The admin token in `path` (one line; surrounding whitespace ignored)."""
    token = Path(path).read_text().strip()
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ValueError(f"{path}: an admin token is one word of at least 16 characters")
    return token


class LogSection(_Section):
    """`[log]`: structured logs on stderr."""

    level: Annotated[Literal["debug", "info", "warning", "error"], Flag("--log-level")] = Field(
        default="info", description="lowest level logged"
    )
    json_lines: Annotated[bool, Flag("--log-json", const=True)] = Field(
        default=False, alias="json", description="JSON log lines"
    )


SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSection,
    "protocol": ProtocolSection,
    "train": TrainSection,
    "aggregation": AggregationSection,
    "model": ModelSection,
    "secure": SecureSection,
    "admin": AdminSection,
    "log": LogSection,
}
"""The sections of the schema, in file order."""


class ControllerSettings(_Section):
    """Every setting of `metis-async serve`, validated; builds the objects the controller takes."""

    server: ServerSection = Field(default_factory=lambda: ServerSection())
    protocol: ProtocolSection = Field(default_factory=lambda: ProtocolSection())
    train: TrainSection = Field(default_factory=lambda: TrainSection())
    aggregation: AggregationSection = Field(default_factory=lambda: AggregationSection())
    model: ModelSection = Field(default_factory=lambda: ModelSection())
    secure: SecureSection = Field(default_factory=lambda: SecureSection())
    admin: AdminSection = Field(default_factory=lambda: AdminSection())
    log: LogSection = Field(default_factory=lambda: LogSection())

    @model_validator(mode="after")
    def _policy_is_valid(self) -> ControllerSettings:
        try:
            policy = self.policy()
        except ValueError as error:
            raise _invalid("protocol", str(error), ProtocolSection.model_fields) from None
        try:
            _compatibility(policy, self.aggregation_settings())
        except ValueError as error:
            raise _invalid("aggregation", str(error), AggregationSection.model_fields) from None
        if self.secure.mode != "none":
            from metis_async.aggregation.compatibility import check_homomorphic
            from metis_async.protocols.secagg import check_secagg_cohort

            try:
                if self.secure.mode == "secagg":
                    from metis_async.protocols import SynchronousPolicy

                    if not isinstance(policy, SynchronousPolicy):
                        raise ValueError(
                            "SecAgg+ runs around round-based protocols (synchronous, "
                            "semi_synchronous)"
                        )
                    aggregation = self.aggregation_settings()
                    if aggregation.robust or aggregation.clip_norm:
                        raise ValueError(
                            "SecAgg+ shows the controller only the sum: robust rules and "
                            "clip_norm need single updates (learners clip to secagg_clip)"
                        )
                    check_secagg_cohort(policy)
                else:
                    public = self.secure.mode == "he-multiparty" or (
                        Path(self.secure.he_file or "").name == "he-public.key"
                    )
                    check_homomorphic(policy, self.aggregation_settings(), public)
            except ValueError as error:
                raise _invalid("secure", str(error), SecureSection.model_fields) from None
        return self

    def policy_settings(self) -> dict[str, object]:
        """Settings for `make_policy(self.protocol.name, ...)`: the keys that were set."""
        section = self.protocol
        settings: dict[str, object] = {
            key: value
            for key in type(section).model_fields
            if key != "name" and (value := getattr(section, key)) is not None
        }
        if section.staleness is not None:
            settings["staleness"] = StalenessFunction.parse(section.staleness)
        settings["train"] = TrainSettings(**self.train.model_dump())
        return settings

    def policy(self) -> Policy:
        """A fresh policy of the chosen protocol with these settings."""
        return make_policy(self.protocol.name, **self.policy_settings())

    def aggregation_settings(self) -> AggregationSettings:
        """The server optimizer, robust rule and clipping."""
        return self.aggregation.settings()

    def controller_config(self) -> ControllerConfig:
        """The controller's network, liveness and limit settings, with the tokens file read."""
        from metis_async.server import ControllerConfig

        server = self.server
        files = {"tokens_file", "token_secret_file", "revoked_file", "insecure"}
        files |= {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "workers"}
        values = server.model_dump(exclude=files)
        values["extra_hosts"] = tuple(h.strip() for h in values["extra_hosts"].split(",") if h)
        tokens = read_tokens(server.tokens_file) if server.tokens_file else None
        config = ControllerConfig(
            **values,
            tokens=tokens,
            token_secret=_read(server.token_secret_file, "token_secret_file", read_secret),
            revoked=_read(server.revoked_file, "revoked_file", read_revoked) or frozenset(),
            tls_cert=_read(server.tls_cert_file, "tls_cert_file", _bytes),
            tls_key=_read(server.tls_key_file, "tls_key_file", _bytes),
            tls_client_ca=_read(server.tls_client_ca_file, "tls_client_ca_file", _bytes),
            he=self.secure.homomorphic(),
            secagg=self.secure.mode == "secagg",
            secagg_clip=self.secure.secagg_clip,
            secagg_step_timeout_seconds=self.secure.secagg_step_timeout_seconds,
        )
        if (config.tls_cert is None) != (config.tls_key is None):
            raise ConfigError(
                [Problem("server.tls_key_file", "tls_cert_file and tls_key_file go together")]
            )
        exposed = [h for h in (config.host, *config.extra_hosts) if not _is_loopback(h)]
        guarded = config.tls_cert is not None and (
            config.verifier() is not None or config.tls_client_ca is not None
        )
        if exposed and not guarded and not server.insecure:
            raise ConfigError(
                [
                    Problem(
                        "server.host",
                        f"listening on {', '.join(exposed)} beyond loopback needs TLS "
                        "(tls_cert_file, tls_key_file) and learner credentials "
                        "(token_secret_file, tokens_file or tls_client_ca_file); "
                        "say --insecure to do without",
                    )
                ]
            )
        return config

    def admin_options(self) -> AdminOptions:
        """The `[admin]` settings with the token read (and `server.revoked_file`)."""
        from metis_async.admin.run import AdminOptions

        admin = self.admin
        return AdminOptions(
            host=admin.host,
            port=admin.port,
            token=admin.token(),
            dashboard_port=admin.dashboard_port,
            interval_seconds=admin.dashboard_interval_seconds,
            revoked_file=self.server.revoked_file,
        )

    def worker_count(self) -> int:
        """Ingest worker processes to run (`auto`: from the cores and the open-file limit)."""
        if self.server.workers == "auto":
            from metis_async.workers import auto_workers

            return auto_workers()
        return int(self.server.workers)

    def warnings(self) -> list[str]:
        """Settings that work but are probably not what was meant."""
        notes = [
            f"aggregation: {w}" for w in _compatibility(self.policy(), self.aggregation_settings())
        ]
        init = self.model.init_model
        if init is not None and not Path(init).is_file():
            notes.append(f"model.init_model: no file {init!r} (relative to the working directory)")
        return notes

    def effective(self) -> dict[str, dict[str, object]]:
        """Every setting in effect, protocol defaults filled in (None: optional and unset)."""
        data: dict[str, dict[str, object]] = self.model_dump(by_alias=True)
        in_effect = POLICIES[self.protocol.name][1](**self.policy_settings())
        protocol: dict[str, object] = {"name": self.protocol.name}
        for key in ProtocolSection.model_fields:
            if key in protocol_keys(self.protocol.name):
                value = getattr(in_effect, key)
                is_staleness = isinstance(value, StalenessFunction)
                protocol[key] = _staleness_text(value) if is_staleness else value
        data["protocol"] = protocol
        return data

    def to_toml(self) -> str:
        """The effective settings as a TOML document that loads back to the same objects."""
        lines = ["# metis-async controller settings in effect (metis-async config show)"]
        for section, values in self.effective().items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                lines.append(f"# {key} is unset" if value is None else f"{key} = {_toml(value)}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Problems: what is wrong, with its key and where the value came from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the settings.

    Attributes:
        key: dotted key (`protocol.buffer_size`), a section, or "" for the whole file.
        message: what is wrong.
        where: where the value came from: `FILE:LINE`, an environment variable or a flag.
    """

    key: str
    message: str
    where: str = ""

    def __str__(self) -> str:
        return ": ".join(part for part in (self.where, self.key, self.message) if part)


class ConfigError(ValueError):
    """Settings that cannot be used; `problems` lists each one with its key."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _invalid(section: str, message: str, keys: Mapping[str, FieldInfo]) -> PydanticCustomError:
    """An error of a settings dataclass, keyed by the first setting its message names."""
    aliases = {"lr": "optimizer_lr"} if section == "aggregation" else {}
    key = section
    for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message):
        word = aliases.get(word, word)
        if word in keys:
            key = f"{section}.{word}"
            break
    return PydanticCustomError("invalid_setting", "{message}", {"message": message, "key": key})


def _problems(error: ValidationError, origin: _Origins) -> list[Problem]:
    problems: list[Problem] = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        ctx = item.get("ctx") or {}
        message = item["msg"]
        if "keys" in ctx:
            keys = str(ctx["keys"]).split(",")
        elif "key" in ctx:
            keys = [str(ctx["key"])]
        else:
            keys = [".".join(loc)]
        if item["type"] == "extra_forbidden":
            message = _unknown(loc)
        elif item["type"] not in (
            "invalid_setting",
            "setting_not_in_protocol",
            "heartbeat_timeout",
        ):
            message = f"{message} (got {item['input']!r})"
        problems.extend(Problem(key, message, origin.of(key)) for key in keys)
    return problems


def _unknown(loc: Sequence[str]) -> str:
    if len(loc) == 1:
        choices, what = list(SECTIONS), "section"
    else:
        model = SECTIONS.get(loc[0])
        choices, what = (_keys(model) if model else []), f"key of [{loc[0]}]"
    close = difflib.get_close_matches(loc[-1], choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; choose from {', '.join(choices)}"
    return f"unknown {what}{hint}"


class _Origins:
    """Where each key's value came from, highest precedence first: flags, environment, file."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.env: dict[str, str] = {}
        self.file: dict[str, int] = {}
        self.path = ""

    def of(self, key: str) -> str:
        if key in self.flags:
            return self.flags[key]
        if key in self.env:
            return self.env[key]
        for candidate in (key, key.partition(".")[0]):
            if candidate in self.file:
                return f"{self.path}:{self.file[candidate]}"
        return self.path


# --------------------------------------------------------------------------------------------
# Sources: file, environment, flags
# --------------------------------------------------------------------------------------------


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Layer | None = None,
) -> ControllerSettings:
    """Validated settings: defaults < the TOML file at `path` < `environ` < `flags`.

    Args:
        path: a TOML file; None uses no file.
        environ: environment variables (`METIS_ASYNC_<SECTION>__<KEY>`); None reads none.
        flags: values from the command line (see `flag_overrides`).

    Raises:
        ConfigError: every problem found, each with its key and where the value came from.
    """
    origin = _Origins()
    data: dict[str, object] = {}
    if path is not None:
        data, origin.file = _read_file(Path(path))
        origin.path = str(path)
    env_layer, origin.env = _environment(environ or {})
    flag_layer = flags or {}
    origin.flags = {
        f"{section}.{key}": _flag_name(section, key)
        for section, keys in flag_layer.items()
        for key in keys
    }
    for layer in (env_layer, flag_layer):
        for section, values in layer.items():
            base = data.get(section)
            data[section] = {**base, **values} if isinstance(base, dict) else dict(values)
    try:
        return ControllerSettings.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems(error, origin)) from None


def check_file(
    path: str | Path, environ: Mapping[str, str] | None = None
) -> tuple[list[Problem], list[str]]:
    """The problems and warnings of the file at `path`, `environ` applied (`config check`)."""
    try:
        settings = load_settings(path, environ)
    except ConfigError as error:
        return error.problems, []
    try:
        settings.controller_config()
        settings.admin_options()  # reads the admin token file
    except ConfigError as error:
        return error.problems, []
    return [], settings.warnings()


def _read_file(path: Path) -> tuple[dict[str, object], dict[str, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            [Problem("", f"cannot read the file: {error.strerror}", str(path))]
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line = re.search(r"line (\d+)", str(error))
        where = f"{path}:{line.group(1)}" if line else str(path)
        raise ConfigError([Problem("", f"not valid TOML: {error}", where)]) from None
    return data, _key_lines(text)


def _key_lines(text: str) -> dict[str, int]:
    """The line of each `[table]` and `key =` in TOML text, as dotted keys (best effort)."""
    lines: dict[str, int] = {}
    table = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        header = re.match(r"^\[\[?([^\]]+)\]\]?", line)
        if header:
            table = _dotted(header.group(1))
            lines.setdefault(table, number)
            continue
        assignment = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", line)
        if assignment:
            key = _dotted(assignment.group(1))
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _dotted(key: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in key.split("."))


def _environment(environ: Mapping[str, str]) -> tuple[Layer, dict[str, str]]:
    layer: Layer = {}
    names: dict[str, str] = {}
    problems: list[Problem] = []
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        model = SECTIONS.get(section)
        fields = _key_fields(model) if model else {}
        if key not in fields:
            loc = [section] if model is None else [section, key]
            problems.append(Problem(".".join(loc), _unknown(loc), name))
            continue
        optional = not fields[key].is_required() and fields[key].default is None
        layer.setdefault(section, {})[key] = None if optional and value == "" else value
        names[f"{section}.{key}"] = name
    if problems:
        raise ConfigError(problems)
    return layer, names


def read_tokens(path: str | Path) -> dict[str, str]:
    """Learner tokens from a TOML file of `learner_id = "token"` lines.

    Raises:
        ConfigError: the file is unreadable, not TOML, or holds a value that is not a string.
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        message = getattr(error, "strerror", None) or str(error)
        raise ConfigError(
            [Problem("server.tokens_file", f"cannot read tokens: {message}", str(path))]
        ) from None
    bad = sorted(k for k, v in data.items() if not isinstance(v, str) or not v)
    if bad:
        raise ConfigError(
            [
                Problem(
                    "server.tokens_file",
                    f"tokens must be non-empty strings: {', '.join(bad)}",
                    str(path),
                )
            ]
        )
    return {k: str(v) for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# Flags: generated from the schema
# --------------------------------------------------------------------------------------------


def _keys(model: type[_Section]) -> list[str]:
    return list(_key_fields(model))


def _key_fields(model: type[_Section]) -> dict[str, FieldInfo]:
    """The fields of a section by their key in the file (the alias, where there is one)."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _flag_of(field: FieldInfo) -> Flag:
    return next((m for m in field.metadata if isinstance(m, Flag)), Flag())


def _flag_name(section: str, key: str) -> str:
    name = _flag_of(_key_fields(SECTIONS[section])[key]).name
    return name or "--" + key.removesuffix("_seconds").replace("_", "-")


def protocol_keys(protocol: str) -> set[str]:
    """The `[protocol]` keys the protocol called `protocol` has."""
    return {f.name for f in dataclasses.fields(POLICIES[protocol][1])} - {"train"}


def _specs() -> Iterator[tuple[str, str, FieldInfo, str]]:
    for section, model in SECTIONS.items():
        for key, field in _key_fields(model).items():
            yield section, key, field, _flag_name(section, key)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting to `parser`; unset flags leave the setting to the lower sources."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, key, field, flag in _specs():
        title = section
        if section == "protocol" and key != "name":
            having = [p for p in POLICIES if key in protocol_keys(p)]
            title = "protocol: " + ("all" if len(having) == len(POLICIES) else ", ".join(having))
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        default = field.default
        if section == "protocol" and key != "name":
            shown = " (default: the protocol's)"
        else:
            shown = "" if default is None or default is False else f" (default: {default})"
        help_text = (field.description or "") + shown
        groups[title].add_argument(
            flag,
            dest=f"{section}.{key}",
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
            **_argparse_kind(key, field),
        )


def _argparse_kind(key: str, field: FieldInfo) -> dict[str, Any]:
    annotation = field.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    flag = _flag_of(field)
    if annotation is bool:
        return {"action": "store_const", "const": True if flag.const is None else flag.const}
    if get_origin(annotation) is Literal:
        return {"choices": list(get_args(annotation))}
    metavar = flag.metavar or (
        "SECONDS" if key.endswith("_seconds") else "BYTES" if key.endswith("_bytes") else None
    )
    return {"type": annotation, "metavar": metavar or key.upper()}


def flag_overrides(args: argparse.Namespace) -> Layer:
    """The settings given as flags (made by `add_flags`) in `args`."""
    given = vars(args)
    layer: Layer = {}
    for section, key, _, _ in _specs():
        if f"{section}.{key}" in given:
            layer.setdefault(section, {})[key] = given[f"{section}.{key}"]
    return layer


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _compatibility(policy: Policy, aggregation: AggregationSettings) -> list[str]:
    """Warnings of `aggregation.compatibility.check_compatible` (ValueError: impossible)."""
    from metis_async.aggregation.compatibility import check_compatible

    return check_compatible(policy, aggregation)


def _staleness_text(function: StalenessFunction) -> str:
    return f"{function.kind}:{function.a!r}:{function.b!r}"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


_T = TypeVar("_T")


def _read(path: str | None, key: str, parse: Callable[[str], _T]) -> _T | None:
    """`parse(path)` for an optional file setting, its failure a problem of `server.<key>`."""
    if path is None:
        return None
    try:
        return parse(path)
    except (OSError, ValueError) as error:
        raise ConfigError(
            [
                Problem(
                    key if "." in key else f"server.{key}",
                    getattr(error, "strerror", None) or str(error),
                    path,
                )
            ]
        ) from None


def _bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
