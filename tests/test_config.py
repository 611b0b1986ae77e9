"""The settings schema: TOML file, environment, flags, precedence, errors, and `config check`."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest

from metis_async import cli
from metis_async.aggregation.server_step import AggregationSettings
from metis_async.config import (
    SECTIONS,
    ConfigError,
    ControllerSettings,
    ProtocolName,
    ProtocolSection,
    TrainSection,
    check_file,
    flag_overrides,
    load_settings,
)
from metis_async.protocols import POLICIES, StalenessFunction, TrainSettings
from metis_async.server import Controller, ControllerConfig

DEPLOYED = Path(__file__).resolve().parents[1] / "deploy" / "controller.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "controller.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _serve_flags(argv: list[str]) -> dict[str, dict[str, object]]:
    return flag_overrides(cli.build_parser().parse_args(["serve", *argv]))


def _problem_texts(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(p) for p in error.value.problems]


# ------------------------------------------------------------------------------ sources


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [server]
        port = 6000
        max_model_bytes = 1000000
        [protocol]
        name = "buffered"
        buffer_size = 5
        staleness = "polynomial:0.5"
        [train]
        learning_rate = 0.5
        [aggregation]
        optimizer = "fedadam"
        optimizer_lr = 0.01
        [model]
        save_model = "final.npz"
        [log]
        json = true
        """,
    )

    settings = load_settings(path)

    assert settings.controller_config().port == 6000
    assert settings.controller_config().max_model_bytes == 1_000_000
    assert settings.policy().settings.buffer_size == 5  # type: ignore[attr-defined]
    assert settings.policy_settings()["staleness"] == StalenessFunction("polynomial", 0.5)
    assert settings.policy_settings()["train"] == TrainSettings(learning_rate=0.5)
    assert settings.aggregation_settings() == AggregationSettings(
        optimizer="fedadam", optimizer_options={"lr": 0.01}
    )
    assert settings.model.save_model == "final.npz"
    assert settings.log.json_lines is True


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[protocol]\nname = "buffered"\nbuffer_size = 5\n')
    env = {"METIS_ASYNC_PROTOCOL__BUFFER_SIZE": "7", "METIS_ASYNC_LOG__JSON": "true"}

    settings = load_settings(path, env)

    assert settings.protocol.buffer_size == 7
    assert settings.log.json_lines is True


def test_flags_override_the_environment_and_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[protocol]\nname = "buffered"\nbuffer_size = 5\n[server]\nport = 1\n')
    env = {"METIS_ASYNC_PROTOCOL__BUFFER_SIZE": "7", "METIS_ASYNC_SERVER__PORT": "2"}

    settings = load_settings(path, env, _serve_flags(["--buffer-size", "9"]))

    assert settings.protocol.buffer_size == 9  # flag over environment over file
    assert settings.server.port == 2  # environment over file


def test_defaults_apply_without_any_source() -> None:
    settings = load_settings()

    assert settings.controller_config() == ControllerConfig()
    assert settings.aggregation_settings() == AggregationSettings()
    assert settings.policy_settings() == {"train": TrainSettings()}


def test_empty_environment_value_unsets_an_optional_key(tmp_path: Path) -> None:
    path = _write(tmp_path, '[aggregation]\nrobust = "median"\n')

    settings = load_settings(path, {"METIS_ASYNC_AGGREGATION__ROBUST": ""})

    assert settings.aggregation.robust is None


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings(None, {"METIS_ASYNC_TOKEN": "x", "HOME": "/root"})

    assert settings == ControllerSettings()


def test_unknown_environment_variable_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, {"METIS_ASYNC_PROTOCOL__BUFER_SIZE": "5"})

    assert _problem_texts(error) == [
        "METIS_ASYNC_PROTOCOL__BUFER_SIZE: protocol.bufer_size: unknown key of [protocol]; "
        "did you mean 'buffer_size'?"
    ]


# ------------------------------------------------------------------------------ problems


def test_unknown_key_names_the_key_and_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[server]\nport = 1\n\n[protocol]\nname = "buffered"\nbufer_size = 5\n')

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert _problem_texts(error) == [
        f"{path}:6: protocol.bufer_size: unknown key of [protocol]; did you mean 'buffer_size'?"
    ]


def test_unknown_section_names_the_section_and_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nport = 1\n[aggregaton]\nrobust = 'median'\n")

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert _problem_texts(error) == [
        f"{path}:3: aggregaton: unknown section; did you mean 'aggregation'?"
    ]


def test_wrong_type_names_the_key_and_its_line(tmp_path: Path) -> None:
    path = _write(tmp_path, '[train]\nlocal_steps = 5\nbatch_size = "big"\n')

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == ("train.batch_size", f"{path}:3")
    assert "valid integer" in problem.message
    assert "'big'" in problem.message


def test_value_out_of_range_names_the_key() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, {"METIS_ASYNC_SERVER__PORT": "70000"})

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == ("server.port", "METIS_ASYNC_SERVER__PORT")


def test_protocol_setting_on_another_protocol_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, '[protocol]\nname = "synchronous"\nalpha = 0.5\nbuffer_size = 5\n')

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    problems = error.value.problems
    assert [(p.key, p.where) for p in problems] == [
        ("protocol.alpha", f"{path}:3"),
        ("protocol.buffer_size", f"{path}:4"),
    ]
    assert "protocol 'synchronous' has no setting alpha, buffer_size" in problems[0].message


def test_flag_the_protocol_lacks_is_an_error_naming_the_flag() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, None, _serve_flags(["--protocol", "synchronous", "--alpha", "0.5"]))

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == ("protocol.alpha", "--alpha")


def test_invalid_protocol_value_is_keyed_by_the_setting(tmp_path: Path) -> None:
    path = _write(tmp_path, "[protocol]\nrounds = 3\nover_selection = 0.5\n")

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert _problem_texts(error) == [
        f"{path}:3: protocol.over_selection: over_selection must be >= 1.0, got 0.5"
    ]


def test_optimizer_option_the_optimizer_lacks_is_keyed_by_the_option(tmp_path: Path) -> None:
    path = _write(tmp_path, '[aggregation]\noptimizer = "fedavg"\nmomentum = 0.9\n')

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == ("aggregation.momentum", f"{path}:3")


def test_toml_syntax_error_gives_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nport = 1\n[protocol\n")

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    (problem,) = error.value.problems
    assert problem.where == f"{path}:3"
    assert problem.message.startswith("not valid TOML")


def test_heartbeat_timeout_must_exceed_the_interval() -> None:
    flags = _serve_flags(["--heartbeat-interval", "10", "--heartbeat-timeout", "5"])

    with pytest.raises(ConfigError) as error:
        load_settings(None, None, flags)

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == (
        "server.heartbeat_timeout_seconds",
        "--heartbeat-timeout",
    )


def test_download_chunks_are_capped_at_the_chunk_limit() -> None:
    flags = _serve_flags(["--max-chunk-bytes", "65536", "--download-chunk-bytes", "131072"])

    config = load_settings(None, None, flags).controller_config()

    assert config.download_chunk() == 65536


# ------------------------------------------------------------------------------ tokens


def test_tokens_come_from_the_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('hospital-7 = "s3cret"\n"learner 2" = "other"\n', encoding="utf-8")

    settings = load_settings(None, {"METIS_ASYNC_SERVER__TOKENS_FILE": str(tokens)})

    assert settings.controller_config().tokens == {"hospital-7": "s3cret", "learner 2": "other"}


def test_tokens_file_with_a_non_string_token_is_a_problem(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text("hospital-7 = 7\n", encoding="utf-8")
    path = _write(tmp_path, f"[server]\ntokens_file = {str(tokens)!r}\n")

    problems, _ = check_file(path, {})

    assert [p.key for p in problems] == ["server.tokens_file"]


# ------------------------------------------------------------------------------ the schema


def test_schema_defaults_match_the_objects_they_build() -> None:
    config = ControllerConfig()
    server = SECTIONS["server"]()
    built = ControllerSettings().controller_config()
    assert built == config
    files = {"tokens_file", "token_secret_file", "revoked_file", "insecure"}
    files |= {"tls_cert_file", "tls_key_file", "tls_client_ca_file", "workers", "extra_hosts"}
    for name, value in server.model_dump(exclude=files).items():
        assert getattr(config, name) == value, name
    assert TrainSettings(**TrainSection().model_dump()) == TrainSettings()
    assert ControllerSettings().aggregation_settings() == AggregationSettings()


def test_schema_has_every_protocol_setting() -> None:
    every = {f.name for _, s in POLICIES.values() for f in dataclasses.fields(s)} - {"train"}

    assert every == set(ProtocolSection.model_fields) - {"name"}
    assert set(get_args(ProtocolName)) == set(POLICIES)


def test_show_output_loads_back_to_the_same_objects(tmp_path: Path) -> None:
    env = {"METIS_ASYNC_PROTOCOL__NAME": "buffered", "METIS_ASYNC_AGGREGATION__ROBUST": "median"}
    settings = load_settings(None, env)
    path = _write(tmp_path, settings.to_toml())

    again = load_settings(path)

    settings_class = POLICIES["buffered"][1]
    assert settings_class(**again.policy_settings()) == settings_class(**settings.policy_settings())
    assert again.aggregation_settings() == settings.aggregation_settings()
    assert again.controller_config() == settings.controller_config()


def test_controller_is_built_from_the_settings() -> None:
    flags = _serve_flags(["--port", "0", "--max-num-examples", "500", "--robust", "median"])
    settings = load_settings(None, None, flags)

    controller = Controller(
        settings.policy(),
        settings.controller_config(),
        aggregation=settings.aggregation_settings(),
    )

    assert controller.config.max_num_examples == 500


# ------------------------------------------------------------------------------ today's flags

# Flag sets users run today (README, tests, the systemd unit) and what the code before the schema
# made of them: (argv, protocol settings, aggregation settings, ControllerConfig fields, model,
# log). The expected objects are spelled out, so a changed meaning of a flag fails here.
TODAY: list[tuple[str, dict[str, Any], AggregationSettings, dict[str, Any], tuple[Any, ...]]] = [
    ("", {"train": TrainSettings()}, AggregationSettings(), {}, (None, None, "info", False)),
    (
        "--port 0 --rounds 3 --min-learners 2 --local-steps 10 --lr 0.5 --save-model f.npz "
        "--log-json",
        {"rounds": 3, "min_learners": 2, "train": TrainSettings(10, 1, 32, 0.5, 0.0)},
        AggregationSettings(),
        {"port": 0},
        (None, "f.npz", "info", True),
    ),
    (
        "--host 0.0.0.0 --insecure --port 50051 --protocol buffered --log-json",
        {"train": TrainSettings()},
        AggregationSettings(),
        {"host": "0.0.0.0", "port": 50051},
        (None, None, "info", True),
    ),
    (
        "--protocol buffered --concurrency 10 --buffer-size 5 --server-lr 0.5 "
        "--staleness polynomial:0.5 --max-staleness 20 --weighting uniform --min-learners 3 "
        "--optimizer fedadam --optimizer-lr 0.01 --beta1 0.8 --beta2 0.95 --tau 0.001 "
        "--clip-norm 2.0 --rounds 30",
        {
            "concurrency": 10,
            "buffer_size": 5,
            "server_learning_rate": 0.5,
            "staleness": StalenessFunction("polynomial", 0.5, 4.0),
            "max_staleness": 20,
            "weighting": "uniform",
            "min_learners": 3,
            "rounds": 30,
            "train": TrainSettings(),
        },
        AggregationSettings(
            optimizer="fedadam",
            optimizer_options={"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "tau": 0.001},
            clip_norm=2.0,
        ),
        {},
        (None, None, "info", False),
    ),
    (
        "--protocol semi_synchronous --budget-factor 1.5 --max-local-steps 80 --measure-once "
        "--round-deadline 10 --learners-per-round 5 --over-selection 1.3 "
        "--min-update-fraction 0.6 --late-learners accept_partial --evaluate-every 2 "
        "--weighting steps --seed 4",
        {
            "budget_factor": 1.5,
            "max_local_steps": 80,
            "recompute_every_round": False,
            "round_deadline_seconds": 10.0,
            "learners_per_round": 5,
            "over_selection": 1.3,
            "min_update_fraction": 0.6,
            "late_learners": "accept_partial",
            "evaluate_every": 2,
            "weighting": "steps",
            "seed": 4,
            "train": TrainSettings(),
        },
        AggregationSettings(),
        {},
        (None, None, "info", False),
    ),
    (
        "--protocol asynchronous --alpha 0.9 --staleness hinge:10:4 --concurrency 3 "
        "--local-steps 0 --epochs 2 --batch-size 16 --proximal-mu 0.01 --log-level debug",
        {
            "alpha": 0.9,
            "staleness": StalenessFunction("hinge", 10.0, 4.0),
            "concurrency": 3,
            "train": TrainSettings(0, 2, 16, 0.1, 0.01),
        },
        AggregationSettings(),
        {},
        (None, None, "debug", False),
    ),
    (
        "--byzantine 2 --learners-per-round 10 --min-update-fraction 0.7 "
        "--robust trimmed_mean --trim-beta 0.2 --optimizer fedavgm --momentum 0.9 "
        "--heartbeat-interval 2 --heartbeat-timeout 10 --init-model m.npz",
        {"learners_per_round": 10, "min_update_fraction": 0.7, "train": TrainSettings()},
        AggregationSettings(
            optimizer="fedavgm",
            optimizer_options={"momentum": 0.9},
            robust="trimmed_mean",
            trim_beta=0.2,
            byzantine=2,
        ),
        {"heartbeat_interval_seconds": 2.0, "heartbeat_timeout_seconds": 10.0},
        ("m.npz", None, "info", False),
    ),
]


@pytest.mark.parametrize(
    ("argv", "policy", "aggregation", "config", "rest"), TODAY, ids=[t[0][:40] for t in TODAY]
)
def test_todays_flags_build_the_same_objects(
    argv: str,
    policy: dict[str, Any],
    aggregation: AggregationSettings,
    config: dict[str, Any],
    rest: tuple[Any, ...],
) -> None:
    settings = load_settings(None, None, _serve_flags(shlex.split(argv)))

    assert settings.policy_settings() == policy
    assert settings.aggregation_settings() == aggregation
    assert settings.controller_config() == ControllerConfig(**config)
    assert (
        settings.model.init_model,
        settings.model.save_model,
        settings.log.level,
        settings.log.json_lines,
    ) == rest


TODAYS_SERVE_FLAGS = (  # noqa: SIM905 - easier to compare with the list in the issue
    "--host --port --init-model --save-model --heartbeat-interval --heartbeat-timeout "
    "--protocol --rounds --min-learners --seed --learners-per-round --over-selection "
    "--round-deadline --min-update-fraction --weighting --late-learners --evaluate-every "
    "--budget-factor --max-local-steps --measure-once --concurrency --max-staleness --staleness "
    "--alpha --buffer-size --server-lr --optimizer --optimizer-lr --beta1 --beta2 --tau "
    "--momentum --robust --trim-beta --byzantine --clip-norm --local-steps --epochs "
    "--batch-size --lr --proximal-mu --log-level --log-json"
).split()


def test_every_flag_of_today_still_exists() -> None:
    serve = _subparser("serve")
    flags = {o for action in serve._actions for o in action.option_strings}

    assert set(TODAYS_SERVE_FLAGS) <= flags
    assert {"--config", "--max-model-bytes", "--max-learner-id-length", "--max-num-examples"} <= (
        flags
    )


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    result: argparse.ArgumentParser = sub.choices[name]
    return result


# ------------------------------------------------------------------------------ the commands


def test_config_check_of_a_good_file_prints_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, '[protocol]\nname = "buffered"\nbuffer_size = 5\n')

    code = cli.main(["config", "check", str(path)])

    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "ok"


def test_config_check_of_a_bad_file_prints_each_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, '[server]\nport = "x"\n[protocol]\nbufer_size = 5\n')

    code = cli.main(["config", "check", str(path)])

    err = capsys.readouterr().err
    assert code == 1
    assert f"{path}:2: server.port:" in err
    assert f"{path}:4: protocol.bufer_size:" in err


def test_config_check_of_a_missing_file_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["config", "check", str(tmp_path / "nope.toml")])

    assert code == 1
    assert "cannot read the file" in capsys.readouterr().err


def test_config_show_prints_the_effective_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, '[protocol]\nname = "buffered"\n')

    code = cli.main(["config", "show", str(path)])

    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r'^staleness = "inverse_sqrt:', out, re.MULTILINE)  # the protocol's default


def test_serve_with_a_bad_config_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, '[protocol]\nname = "asynchronous"\nbuffer_size = 5\n')

    code = cli.main(["serve", "--config", str(path)])

    assert code == 2
    assert f"{path}:3: protocol.buffer_size:" in capsys.readouterr().err


# ------------------------------------------------------------------------------ deploy/


def _deployed_keys(tmp_path: Path) -> dict[str, str]:
    """The example's TLS and token files, made with `metis-async keys`, as env overrides."""
    keys = tmp_path / "keys"
    for argv in (["ca", str(keys)], ["server", str(keys), "--host", "controller.example"]):
        assert cli.main(["keys", *argv]) == 0
    assert cli.main(["keys", "token-secret", str(keys / "token-secret")]) == 0
    assert cli.main(["keys", "admin-token", str(keys / "admin.token")]) == 0
    return {
        "METIS_ASYNC_SERVER__TLS_CERT_FILE": str(keys / "server.crt"),
        "METIS_ASYNC_SERVER__TLS_KEY_FILE": str(keys / "server.key"),
        "METIS_ASYNC_SERVER__TOKEN_SECRET_FILE": str(keys / "token-secret"),
        "METIS_ASYNC_ADMIN__TOKEN_FILE": str(keys / "admin.token"),
    }


def test_deployed_example_passes_check_with_its_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in _deployed_keys(tmp_path).items():
        monkeypatch.setenv(name, value)

    code = cli.main(["config", "check", str(DEPLOYED)])

    assert code == 0, capsys.readouterr().err


def test_deployed_example_without_its_key_files_is_a_clear_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["config", "check", str(DEPLOYED)])

    assert code == 1
    assert "server.token_secret_file" in capsys.readouterr().err


def test_deployed_example_loads_and_documents_every_key() -> None:
    text = DEPLOYED.read_text(encoding="utf-8")

    settings = load_settings(DEPLOYED)

    assert settings.protocol.name == "buffered"
    for section, model in SECTIONS.items():
        assert f"[{section}]" in text
        for name, field in model.model_fields.items():
            key = field.alias or name
            assert re.search(rf"^#? ?{key} =", text, re.MULTILINE), f"{section}.{key}"


# ------------------------------------------------------------------------------ cross-checks


def test_robust_rule_the_protocol_cannot_commit_with_is_an_error() -> None:
    flags = _serve_flags(["--protocol", "asynchronous", "--robust", "median"])

    with pytest.raises(ConfigError) as error:
        load_settings(None, None, flags)

    (problem,) = error.value.problems
    assert (problem.key, problem.where) == ("aggregation.robust", "--robust")


def test_secagg_with_a_robust_rule_is_an_error() -> None:
    flags = _serve_flags(["--secure", "secagg", "--robust", "median", "--min-learners", "5"])

    with pytest.raises(ConfigError) as error:
        load_settings(None, None, flags)

    (problem,) = error.value.problems
    assert problem.key.startswith("secure")
    assert "only the sum" in problem.message


def test_secagg_rounds_of_two_learners_are_an_error() -> None:
    flags = _serve_flags(["--secure", "secagg", "--min-learners", "2"])

    with pytest.raises(ConfigError, match="at least 3 learners"):
        load_settings(None, None, flags)


def test_config_check_reads_the_admin_token_file(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(f'[admin]\nport = 0\ntoken_file = "{tmp_path / "missing.token"}"\n')

    problems, _ = check_file(config)

    assert [p.key for p in problems] == ["admin.token_file"]


def test_krum_with_enough_updates_per_round_loads() -> None:
    argv = "--robust krum --byzantine 1 --learners-per-round 10 --min-update-fraction 0.5"
    flags = _serve_flags(shlex.split(argv))

    settings = load_settings(None, None, flags)

    assert settings.aggregation_settings().robust == "krum"


def test_settings_that_work_but_do_less_give_warnings(tmp_path: Path) -> None:
    path = _write(tmp_path, '[aggregation]\nrobust = "median"\n')

    problems, warnings = check_file(path, {})

    assert problems == []
    assert any("no robustness" in w for w in warnings)


def test_serve_and_config_work_without_the_demo_packages() -> None:
    # structlog imports rich when it is there; the controller must not need it.
    code = """
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("rich", "sklearn"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Absent())
from metis_async import cli, config, server
args = cli.build_parser().parse_args(["serve", "--protocol", "buffered", "--log-json"])
settings = config.load_settings(None, None, config.flag_overrides(args))
server.Controller(settings.policy(), settings.controller_config())
print("ok")
"""

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)

    assert out.stdout.strip() == "ok", out.stderr


def test_systemd_unit_notifies_and_keeps_its_state_where_the_example_config_points() -> None:
    unit = (DEPLOYED.parent / "metis-async.service").read_text(encoding="utf-8")
    directives = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )

    settings = load_settings(DEPLOYED)

    assert directives["Type"] == "notify"
    assert int(directives["WatchdogSec"]) > 0
    assert directives["Restart"] == "on-failure"
    assert int(directives["LimitNOFILE"]) >= 200_000  # 100K+ learners, one connection each
    assert settings.server.state_dir == f"/var/lib/{directives['StateDirectory']}"
    assert "serve --config /etc/metis-async/controller.toml" in directives["ExecStart"]


def test_listening_beyond_loopback_needs_tls_and_credentials() -> None:
    exposed = load_settings(None, {"METIS_ASYNC_SERVER__HOST": "0.0.0.0"})
    allowed = load_settings(
        None, {"METIS_ASYNC_SERVER__HOST": "0.0.0.0", "METIS_ASYNC_SERVER__INSECURE": "true"}
    )

    with pytest.raises(ConfigError, match="beyond loopback needs TLS"):
        exposed.controller_config()
    assert allowed.controller_config().host == "0.0.0.0"
