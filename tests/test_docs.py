"""Every shell command in docs/*.md is exercised by a test, and the generated pages are current.

Convention of the docs (docs/README.md says it to readers):

- Shell commands live in fenced ```console blocks, one command per line starting with `$ `; a
  line ending in ` \\` continues on the next one. Lines without `$ ` are output, not run.
  Other shell fences (```bash, ```sh, ```shell, ```zsh) are refused in docs/, so no command
  escapes the check.
- A console block whose first line is `# not run by tests: REASON` holds commands a test cannot
  run (root, systemd, a remote host, big downloads). Each of them must also be listed in
  `NOT_RUN` below, with the tests that check what can be checked (the systemd unit's content).
- Every other command is either run here for real, by the scenario test of its section (the
  nearest heading above it, `RUN_SECTIONS`), or mapped in `COVERED` to the existing test that
  runs it (the README's demo and test commands, the adapters' federations, the slow FHE export).
  `test_every_command_is_run_or_mapped` fails on a command that is none of these.

How a section runs (`DocShell`): its commands in order, through bash, in a fresh directory under
tmp_path, with `metis-async` and `python` on PATH meaning this interpreter and this checkout.
`metis-async serve` and `metis-async learner` are long-running (a reader gives each its own
terminal): they start in the background, and the next command waits until the controller's
ports accept connections, or until the controller has logged the learner's join (and the
initial model). Every other command must exit 0 within its timeout. At the end of the section
every background process must exit 0 by itself. `export NAME=VALUE` lines set the environment
of the later commands. Substitutions, and nothing else: the documented ports 50051, 50052, 8080
and 9464 become free ports on 127.0.0.1; `.venv/bin/` is dropped (PATH has the shim); in the
systemd section (`root=True`) `sudo` and `sudo -u metis-async` are dropped and /etc/metis-async,
/var/lib/metis-async and /opt/metis-async/.venv/bin/ point into tmp_path. Every subprocess has a
timeout, everything listens on loopback, and only processes started here are stopped, by
process group. The four `demo --secure` runs of secure-aggregation.md are marked slow (about
30 s on an idle 2-core machine, `pytest -m slow`); the rest takes about 25 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
UNIT = ROOT / "deploy" / "metis-async.service"
SHELL_FENCES = {"bash", "sh", "shell", "zsh", "shell-session"}
NOT_RUN_MARK = "# not run by tests:"
DOC_PORTS = (50051, 50052, 8080, 9464)
FOREGROUND_SECONDS = 90.0
WAIT_SECONDS = 60.0
FINISH_SECONDS = 120.0
BACKGROUND = {("metis-async", "serve"), ("metis-async", "learner")}

# --------------------------------------------------------------------------------------------
# What exercises each command that is not run by a section's scenario
# --------------------------------------------------------------------------------------------

# Command (continuations joined) -> where it runs: "tests/FILE.py::TEST" (the test must exist)
# or "PATH::TEXT" (the file must contain TEXT).
COVERED: dict[str, tuple[str, ...]] = {
    # quick-start.md: the README's two commands, word for word
    'python3 -m venv .venv && .venv/bin/pip install ".[demo]" && .venv/bin/metis-async demo': (
        ".ci/run::make demo-check",
        "Makefile::.venv/bin/metis-async demo --json --no-progress",
        "tests/test_cli.py::test_demo_json_reports_a_trained_model",
    ),
    'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && .venv/bin/pytest': (
        '.ci/run::python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
        ".venv/bin/pytest",
    ),
    # writing-a-learner.md: the adapters' tests run exactly these lines
    "metis-async serve --port 50051 --rounds 5 --min-learners 2 --local-steps 0 --epochs 1 "
    "--lr 0.5 --save-model final.npz": (
        "tests/test_adapters_sklearn.py::test_the_docs_commands_train_the_sklearn_example",
        "tests/test_adapters_torch.py::test_the_docs_commands_train_the_torch_example",
    ),
    "python -m metis_async.examples.sklearn_digits --server 127.0.0.1:50051 --index 0 --of 2": (
        "tests/test_adapters_sklearn.py::test_the_docs_commands_train_the_sklearn_example",
    ),
    "python -m metis_async.examples.sklearn_digits --server 127.0.0.1:50051 --index 1 --of 2": (
        "tests/test_adapters_sklearn.py::test_the_docs_commands_train_the_sklearn_example",
    ),
    "python -m metis_async.examples.torch_digits --server 127.0.0.1:50051 --index 0 --of 2": (
        "tests/test_adapters_torch.py::test_the_docs_commands_train_the_torch_example",
    ),
    "python -m metis_async.examples.torch_digits --server 127.0.0.1:50051 --index 1 --of 2": (
        "tests/test_adapters_torch.py::test_the_docs_commands_train_the_torch_example",
    ),
    # secure-aggregation.md: placeholders for a controller.toml of your own
    "metis-async serve --config controller.toml   "
    '# [secure] mode = "he", he_file = "keys/he-controller.json"': (
        "tests/test_he_federation.py::test_rounds_commit_the_encrypted_weighted_average",
        "tests/test_he_federation.py::test_round_less_policies_step_on_ciphertexts",
    ),
    "metis-async learner --he-keys keys/he-learner.key --address ...": (
        "tests/test_he_federation.py::test_rounds_commit_the_encrypted_weighted_average",
    ),
    "metis-async keys he-committee-init committee/ --parties 3        # settings, a fresh CRS, P": (
        "tests/test_he_federation.py::test_committee_keys_from_the_cli_serve_a_federation",
    ),
    "metis-async keys he-party committee/he-committee.json --index 0 -o member0/   "
    "# on member 0's machine": (
        "tests/test_he_federation.py::test_committee_keys_from_the_cli_serve_a_federation",
    ),
    "metis-async keys he-committee committee/he-committee.json member*/he-share-*.bin   "
    "# collective key": (
        "tests/test_he_federation.py::test_committee_keys_from_the_cli_serve_a_federation",
    ),
    'metis-async serve --config controller.toml     # [secure] mode = "secagg"': (
        "tests/test_secagg_federation.py::test_rounds_commit_the_mean_of_masked_deltas",
    ),
    # secure-inference.md: concrete-ml's environment is 6 GB, so these are slow tests
    "metis-async export-fhe model.npz -o fhe/                     "
    "# fhe/client.zip server.zip manifest.json": (
        "tests/test_export_fhe.py::test_encrypted_predictions_agree_with_the_clear_model",
    ),
    "metis-async export-fhe model.npz -o fhe/ --check 450 --json  "
    "# and run 450 test digits encrypted": (
        "tests/test_export_fhe.py::test_encrypted_predictions_agree_with_the_clear_model",
    ),
    "metis-async export-fhe state/checkpoint-0000000040.npz -o fhe/   "
    "# a controller checkpoint works too": (
        "tests/test_export_fhe.py::test_a_clear_checkpoint_gives_the_model_and_its_version",
    ),
    # benchmarks.md
    'pip install ".[bench]"': ("tests/test_docs.py::test_the_bench_extra_exists",),
}

# Commands matching a pattern: every `python benches/X.py ...` line is parsed by the script's own
# argument parser (a benchmark takes minutes to hours; benches/README.md records the runs).
COVERED_PATTERNS: dict[str, tuple[str, ...]] = {
    r"^python benches/\w+\.py( |$)": (
        "tests/test_docs.py::test_benchmark_commands_are_accepted_by_their_scripts",
    ),
}

_ROOT_SETUP = ("tests/test_docs.py::test_the_systemd_unit_matches_the_deploying_doc",)
_SYSTEMD = (
    "tests/test_docs.py::test_the_systemd_unit_matches_the_deploying_doc",
    "tests/test_systemd.py::test_serve_is_ready_pets_the_watchdog_and_stops_cleanly_on_sigterm",
    "tests/test_cli.py::test_serve_drains_on_sigterm_and_learners_come_back_after_a_restart",
    "tests/test_security.py::test_revocations_take_effect_without_a_restart",
)

# Commands in `# not run by tests:` blocks -> the tests that check what can be checked of them.
NOT_RUN: dict[str, tuple[str, ...]] = {
    # deploying.md
    "ssh -L 8080:127.0.0.1:8080 -L 50052:127.0.0.1:50052 fl.example.org": (),
    "sudo useradd --system --no-create-home --shell /usr/sbin/nologin metis-async": _ROOT_SETUP,
    "sudo python3 -m venv /opt/metis-async/.venv": _ROOT_SETUP,
    "sudo /opt/metis-async/.venv/bin/pip install .": _ROOT_SETUP,
    "sudo install -m 0644 deploy/metis-async.service /etc/systemd/system/metis-async.service": (
        _ROOT_SETUP
    ),
    "sudo install -d -m 0750 -g metis-async /etc/metis-async": _ROOT_SETUP,
    # stood in for by the systemd scenario (STAND_INS), so its `config check` runs for real
    "sudo install -m 0640 -g metis-async deploy/controller.toml /etc/metis-async/controller.toml": (
        "tests/test_docs.py::test_the_systemd_sections_commands",
    ),
    "sudo chgrp -R metis-async /etc/metis-async": _ROOT_SETUP,
    "sudo chmod -R g+rX,o= /etc/metis-async": _ROOT_SETUP,
    "sudo systemctl daemon-reload": _SYSTEMD,
    "sudo systemctl enable --now metis-async": _SYSTEMD,
    "systemctl status metis-async": _SYSTEMD,
    "journalctl -u metis-async -f": _SYSTEMD,
    "sudo systemctl reload metis-async": _SYSTEMD,
    "sudo systemctl stop metis-async": _SYSTEMD,
    # the same flags run on loopback in "Try it on one machine"
    'metis-async learner --address fl.example.org:50051 --learner-id hospital-7 --token "$(cat '
    'hospital-7.token)" --tls-ca ca.crt': ("tests/test_docs.py::test_deploying_on_one_machine",),
    "sudo -u metis-async /opt/metis-async/.venv/bin/metis-async status --config "
    "/etc/metis-async/controller.toml --ca /etc/metis-async/tls/ca.crt": (
        "tests/test_docs.py::test_deploying_on_one_machine",
        "tests/test_admin.py::test_the_command_line_says_where_it_looked",
    ),
    # secure-inference.md
    "python3.11 -m venv DIR": (),
    "DIR/bin/pip install torch==2.3.1 --index-url https://download.pytorch.org/whl/cpu": (),
    "DIR/bin/pip install concrete-ml==1.9.0": (),
    "metis-async export-fhe model.npz -o fhe/ --venv DIR": (
        "tests/test_export_fhe.py::test_encrypted_predictions_agree_with_the_clear_model",
    ),
}

# (doc, section heading) -> the test below that runs every command of that section.
RUN_SECTIONS: dict[tuple[str, str], str] = {
    ("quick-start.md", "3. A federation by hand"): "test_quick_start_federation_by_hand",
    ("concepts.md", "Seeing the settings in effect"): "test_concepts_commands",
    ("configuration.md", "Configuration reference"): "test_configuration_commands",
    ("deploying.md", "Try it on one machine"): "test_deploying_on_one_machine",
    ("deploying.md", "Install under systemd"): "test_the_systemd_sections_commands",
    (
        "secure-aggregation.md",
        "BFV with a shared learner key (`he`) — MetisFL's model",
    ): "test_secure_aggregation_key_commands",
    (
        "secure-aggregation.md",
        "Try each one (digits, 10 learner processes, loopback)",
    ): "test_secure_aggregation_demo_commands",
    ("secure-inference.md", "Commands"): "test_secure_inference_training_command",
}


# --------------------------------------------------------------------------------------------
# Reading the docs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One `$ ` command of a console block.

    Attributes:
        doc: the file's name in docs/.
        section: the nearest heading above the block (without its #s).
        text: the command, continuation lines joined with one space.
        line: where it starts (1-based).
        not_run: the block's `# not run by tests:` reason, if it has one.
    """

    doc: str
    section: str
    text: str
    line: int
    not_run: str | None = None


@dataclass(frozen=True)
class Block:
    """A fenced block: its language, first line number and lines (fence indentation removed)."""

    doc: str
    section: str
    language: str
    line: int
    lines: list[str] = field(default_factory=list)


def doc_files() -> list[Path]:
    """Every page of docs/ (DESIGN-NOTES.md included: it has no commands, and must keep so)."""
    return sorted(DOCS.glob("*.md"))


def blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of one markdown file, with the heading each sits under."""
    section = ""
    fence: re.Match[str] | None = None
    current: Block | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            opened = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", raw)
            if opened:
                fence = opened
                current = Block(path.name, section, opened.group(3).lower(), number)
                continue
            heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", raw)
            if heading:
                section = heading.group(1)
            continue
        assert current is not None
        indent, marks = fence.group(1), fence.group(2)
        if raw.strip().startswith(marks) and raw.strip().strip(marks[0]) == "":
            yield current
            fence, current = None, None
            continue
        current.lines.append(raw[len(indent) :] if raw.startswith(indent) else raw.lstrip())


def commands_of(block: Block) -> list[Command]:
    """The `$ ` commands of a console block."""
    reason = None
    first = next((line.strip() for line in block.lines if line.strip()), "")
    if first.startswith(NOT_RUN_MARK):
        reason = first[len(NOT_RUN_MARK) :].strip()
    found: list[Command] = []
    lines = iter(enumerate(block.lines))
    for offset, line in lines:
        if not line.startswith("$ "):
            continue
        text = line[2:].rstrip()
        while text.endswith("\\"):
            _, more = next(lines, (0, ""))
            text = text[:-1].rstrip() + " " + more.strip()
        found.append(Command(block.doc, block.section, text, block.line + 1 + offset, reason))
    return found


def all_commands() -> list[Command]:
    """Every command of every page of docs/, in order."""
    return [
        command
        for path in doc_files()
        for block in blocks(path)
        if block.language == "console"
        for command in commands_of(block)
    ]


def section_commands(doc: str, section: str) -> list[Command]:
    """The commands of one section, in order (at least one, or the section was renamed)."""
    found = [c for c in all_commands() if c.doc == doc and c.section == section]
    assert found, f"no commands under {section!r} in docs/{doc}: renamed? update RUN_SECTIONS"
    return found


def _covered_by(text: str) -> tuple[str, ...] | None:
    if text in COVERED:
        return COVERED[text]
    for pattern, refs in COVERED_PATTERNS.items():
        if re.search(pattern, text):
            return refs
    return None


# --------------------------------------------------------------------------------------------
# Running a section
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Background:
    command: Command
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.command.text}\n" + "\n".join(text.splitlines()[-lines:])


class DocShell:
    """Runs doc commands as a reader would, in `workdir` (see the module docstring).

    Args:
        tmp_path: the test's directory; the work directory, shims and logs go below it.
        root: emulate root for the systemd section (sudo dropped, system paths in tmp_path).
    """

    def __init__(self, tmp_path: Path, root: bool = False) -> None:
        self.workdir = tmp_path / "work"
        self.workdir.mkdir()
        (self.workdir / "deploy").symlink_to(ROOT / "deploy")
        self.system = tmp_path / "system" if root else None
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        bindir = tmp_path / "bin"
        bindir.mkdir()
        for name, target in (("metis-async", "-m metis_async.cli"), ("python", "")):
            shim = bindir / name
            shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {target} "$@"\n')
            shim.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("METIS_ASYNC_")}
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.env = env
        self.ports = {port: _free_port() for port in DOC_PORTS}
        self.background: list[_Background] = []
        self.controller: _Background | None = None
        self.learners_started = 0

    # ------------------------------------------------------------------------ substitutions

    def substitute(self, text: str) -> str:
        """The command as it runs here: free ports, the shims, the emulated system paths."""
        for port, free in self.ports.items():
            text = re.sub(rf"(?<![\d.]){port}(?!\d)", str(free), text)
        text = re.sub(r"(?<![\w/.])\.venv/bin/", "", text)
        if self.system is not None:
            text = text.replace("sudo -u metis-async ", "").replace("sudo ", "")
            text = text.replace("/opt/metis-async/.venv/bin/", "")
            for path in ("/etc/metis-async", "/var/lib/metis-async"):
                text = text.replace(path, f"{self.system}{path}")
        return text

    # ------------------------------------------------------------------------ running

    def run_all(
        self,
        commands: list[Command],
        stand_ins: dict[str, Callable[[DocShell], None]] | None = None,
        timeout: float = FOREGROUND_SECONDS,
    ) -> dict[str, subprocess.CompletedProcess[str]]:
        """Run `commands` in order, then wait for the background ones; returns the results of
        the foreground commands by their doc text. Commands mapped in `COVERED` are skipped
        (their own test runs them); not-run ones too, or replaced by their stand-in."""
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        for command in commands:
            if command.not_run is not None:
                stand_in = (stand_ins or {}).get(command.text)
                if stand_in is not None:
                    stand_in(self)
                continue
            if _covered_by(command.text) is not None:
                continue  # mapped to the test that runs it
            result = self.run(command, timeout)
            if result is not None:
                results[command.text] = result
        self.finish()
        return results

    def run(
        self, command: Command, timeout: float = FOREGROUND_SECONDS
    ) -> subprocess.CompletedProcess[str] | None:
        """Run one command: `export` sets variables, serve/learner start in the background,
        the rest must exit 0 within `timeout` seconds."""
        text = self.substitute(command.text)
        words = shlex.split(text, comments=True)
        if words and words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value
            return None
        if len(words) >= 2 and (Path(words[0]).name, words[1]) in BACKGROUND:
            self._start(command, text, words)
            return None
        try:
            result = subprocess.run(
                ["bash", "-c", text],
                cwd=self.workdir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise AssertionError(
                f"{command.doc}:{command.line}: {text} ran past {timeout} s\n" + self._tails()
            ) from error
        assert result.returncode == 0, (
            f"{command.doc}:{command.line}: {text} exited {result.returncode}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}\n{self._tails()}"
        )
        return result

    def _start(self, command: Command, text: str, words: list[str]) -> None:
        log = self.logs / f"{len(self.background)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {text}"],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        started = _Background(command, process, log)
        self.background.append(started)
        if words[1] == "serve":
            self.controller = started
            self._wait_for_ports(started, words)
        else:
            self.learners_started += 1
            self._wait_for_join(started)

    def _wait_for_ports(self, started: _Background, words: list[str]) -> None:
        """Until every port the controller was given (learners, admin, dashboard, metrics)
        accepts connections on 127.0.0.1."""
        flags = {"--port", "--admin-port", "--dashboard-port", "--metrics-port"}
        ports = [int(words[i + 1]) for i, w in enumerate(words[:-1]) if w in flags]
        deadline = time.monotonic() + WAIT_SECONDS
        for port in ports:
            while True:
                self._alive(started)
                with socket.socket() as s:
                    s.settimeout(1.0)
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} not open in time\n{self._tails()}")
                time.sleep(0.1)

    def _wait_for_join(self, learner: _Background) -> None:
        """Until the controller logged as many joins as learners were started (and the initial
        model, when it has none of its own)."""
        controller = self.controller
        assert controller is not None, "a learner command before any serve command"
        needs_model = "--init-model" not in controller.command.text
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            self._alive(learner)
            self._alive(controller)
            log = controller.log.read_text(errors="replace")
            joined = log.count("learner_joined") >= self.learners_started
            if joined and (not needs_model or "model_initialized" in log):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the learner did not join in time\n{self._tails()}")
            time.sleep(0.1)

    def _alive(self, started: _Background) -> None:
        code = started.process.poll()
        if code is not None and code != 0:
            raise AssertionError(f"{started.command.text} exited {code}\n{self._tails()}")

    def finish(self) -> None:
        """Wait for every background process to end by itself, each with exit status 0."""
        deadline = time.monotonic() + FINISH_SECONDS
        for started in self.background:
            try:
                code = started.process.wait(timeout=max(deadline - time.monotonic(), 1.0))
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"{started.command.text} did not end in time\n{self._tails()}"
                ) from None
            assert code == 0, f"{started.command.text} exited {code}\n{self._tails()}"

    def stop(self) -> None:
        """Kill what is still running (only the process groups started here)."""
        for started in self.background:
            if started.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(started.process.pid, signal.SIGKILL)
                started.process.wait(timeout=10)

    def _tails(self) -> str:
        return "\n".join(started.tail() for started in self.background)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[DocShell]:
    doc_shell = DocShell(tmp_path)
    yield doc_shell
    doc_shell.stop()


def _needs(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the doc's commands need {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# The convention and the coverage
# --------------------------------------------------------------------------------------------


def test_shell_blocks_use_the_console_convention() -> None:
    wrong = [
        f"{block.doc}:{block.line}: ```{block.language or '(no language)'}"
        for path in doc_files()
        for block in blocks(path)
        if block.language in SHELL_FENCES
        or (block.language == "" and any(line.startswith("$ ") for line in block.lines))
    ]

    assert not wrong, "shell commands go in ```console blocks with `$ ` prompts: " + str(wrong)


def test_every_command_is_run_or_mapped() -> None:
    uncovered = []
    for command in all_commands():
        where = f"docs/{command.doc}:{command.line}: {command.text}"
        if command.not_run is not None:
            if command.text not in NOT_RUN:
                uncovered.append(f"{where} (not run by tests, but not in NOT_RUN)")
        elif command.text in NOT_RUN:
            uncovered.append(f"{where} (in NOT_RUN, but its block is not marked not run)")
        elif _covered_by(command.text) is None and (
            (command.doc, command.section) not in RUN_SECTIONS
        ):
            uncovered.append(where)

    assert not uncovered, "commands no test runs; run them here or map them:\n" + "\n".join(
        uncovered
    )


def test_the_tables_name_only_commands_the_docs_have() -> None:
    texts = {command.text for command in all_commands()}
    sections = {(command.doc, command.section) for command in all_commands()}

    assert sorted(set(COVERED) - texts) == []
    assert sorted(set(NOT_RUN) - texts) == []
    assert sorted(set(RUN_SECTIONS) - sections) == []
    assert all(name in globals() for name in RUN_SECTIONS.values())


def test_the_mapped_tests_exist() -> None:
    refs = {
        ref for table in (COVERED, COVERED_PATTERNS, NOT_RUN) for v in table.values() for ref in v
    }
    missing = []
    for ref in sorted(refs):
        path, _, name = ref.partition("::")
        file = ROOT / path
        if not file.is_file():
            missing.append(ref)
        elif path.startswith("tests/") and path.endswith(".py"):
            if not re.search(rf"^(async )?def {re.escape(name)}\(", file.read_text(), re.M):
                missing.append(ref)
        elif name not in file.read_text():
            missing.append(ref)

    assert not missing, missing


def test_the_quick_start_runs_the_readmes_two_commands_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first = [c.text for c in all_commands() if c.doc == "quick-start.md"][:2]

    assert [text in readme for text in first] == [True, True], first


def test_the_index_links_every_page() -> None:
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    pages = [p.name for p in doc_files() if p.name != "README.md"]

    assert [p for p in pages if f"]({p})" not in index] == []


def test_toml_snippets_are_valid_controller_settings(tmp_path: Path) -> None:
    from metis_async.config import SECTIONS, load_settings

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    checked = 0
    for path in doc_files():
        for block in blocks(path):
            if block.language != "toml":
                continue
            text = "\n".join(block.lines)
            if not set(tomllib.loads(text)) & set(SECTIONS):
                continue  # not a controller settings file
            file = tmp_path / f"{path.stem}-{block.line}.toml"
            file.write_text(text)
            load_settings(file, {})  # ConfigError names the doc's key and line
            checked += 1

    assert checked >= 5


# --------------------------------------------------------------------------------------------
# The sections run for real
# --------------------------------------------------------------------------------------------


def test_quick_start_federation_by_hand(shell: DocShell) -> None:
    _needs("curl")

    results = shell.run_all(section_commands("quick-start.md", "3. A federation by hand"))

    status = next(r.stdout for text, r in results.items() if text == "metis-async status")
    assert "synchronous" in status
    assert "version 0:" in results["metis-async model get -o model.npz"].stdout
    with np.load(shell.workdir / "final.npz") as npz:
        assert npz["arr_0"].shape == (65, 10)
    assert sorted(p.name for p in (shell.workdir / "state").glob("checkpoint-*.npz"))[-1] == (
        "checkpoint-0000000020.npz"
    )


def test_concepts_commands(shell: DocShell) -> None:
    results = shell.run_all(section_commands("concepts.md", "Seeing the settings in effect"))

    (shown,) = results.values()
    assert 'staleness = "inverse_sqrt:0.5:4.0"' in shown.stdout


def test_configuration_commands(shell: DocShell) -> None:
    results = shell.run_all(section_commands("configuration.md", "Configuration reference"))

    assert any("buffer_size = 20" in r.stdout for r in results.values())


def test_deploying_on_one_machine(shell: DocShell) -> None:
    _needs("curl")

    shell.run_all(section_commands("deploying.md", "Try it on one machine"))

    assert (shell.workdir / "revoked").read_text().split() == ["hospital-9"]
    assert (shell.workdir / "state").is_dir()


def _install_controller_toml(shell: DocShell) -> None:
    """Stands in for `sudo install ... deploy/controller.toml /etc/metis-async/...`: the same
    file, its system paths pointed into the emulated system directory."""
    assert shell.system is not None
    text = (ROOT / "deploy" / "controller.toml").read_text(encoding="utf-8")
    for path in ("/etc/metis-async", "/var/lib/metis-async"):
        text = text.replace(path, f"{shell.system}{path}")
    (shell.system / "etc" / "metis-async" / "controller.toml").write_text(text)


def test_the_systemd_sections_commands(tmp_path: Path) -> None:
    shell = DocShell(tmp_path, root=True)
    install = next(t for t in NOT_RUN if t.startswith("sudo install -m 0640 -g metis-async"))
    try:
        results = shell.run_all(
            section_commands("deploying.md", "Install under systemd"),
            stand_ins={install: _install_controller_toml},
        )
    finally:
        shell.stop()

    checked = [r for text, r in results.items() if " config check " in text]
    assert [r.stdout.strip() for r in checked] == ["ok"]


def test_secure_aggregation_key_commands(shell: DocShell) -> None:
    section = "BFV with a shared learner key (`he`) — MetisFL's model"

    shell.run_all(section_commands("secure-aggregation.md", section))

    assert sorted(p.name for p in (shell.workdir / "keys").iterdir()) == [
        "he-controller.json",
        "he-learner.key",
        "he-public.key",
    ]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_secure_aggregation_demo_commands(shell: DocShell) -> None:
    section = "Try each one (digits, 10 learner processes, loopback)"

    results = shell.run_all(section_commands("secure-aggregation.md", section), timeout=600)

    for text, result in results.items():
        accuracy = float(re.findall(r"test accuracy ([\d.]+)", result.stdout)[-1])
        assert accuracy >= 0.85, (text, result.stdout)


def test_secure_inference_training_command(shell: DocShell) -> None:
    shell.run_all(section_commands("secure-inference.md", "Commands"), timeout=240)

    with np.load(shell.workdir / "model.npz") as npz:
        assert npz["arr_0"].shape == (65, 10)


# --------------------------------------------------------------------------------------------
# What the mapped commands rest on
# --------------------------------------------------------------------------------------------


def test_configuration_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z]+)=(.*)$", line.strip())
        if match:
            settings.setdefault(match.group(1), []).append(match.group(2))
    return settings


def test_the_systemd_unit_matches_the_deploying_doc() -> None:
    from metis_async.config import ServerSection

    doc = (DOCS / "deploying.md").read_text(encoding="utf-8")
    unit = _unit()
    # The first cells of the doc's table of the unit's settings ("| `Type=notify`, ... |").
    cells = [line.split("|")[1] for line in doc.splitlines() if line.startswith("| `")]
    stated = [p for cell in cells for p in re.findall(r"`([A-Z][A-Za-z]+)=([^`]+)`", cell)]
    commands = [c.text for c in all_commands() if c.doc == "deploying.md"]
    exec_start = unit["ExecStart"][0]

    assert len(stated) >= 10
    assert [f"{k}={v}" for k, v in stated if v not in unit.get(k, [])] == []
    assert exec_start == (
        "/opt/metis-async/.venv/bin/metis-async serve --config /etc/metis-async/controller.toml"
    )
    assert "sudo python3 -m venv /opt/metis-async/.venv" in commands
    assert any(c.endswith("/etc/metis-async/controller.toml") for c in commands if " install " in c)
    assert any(c.endswith(f"--shell /usr/sbin/nologin {unit['User'][0]}") for c in commands)
    assert any(c.endswith("/etc/systemd/system/metis-async.service") for c in commands)
    # The drain (drain_seconds) fits in the stop timeout, or systemd kills a clean stop.
    assert ServerSection().drain_seconds < float(unit["TimeoutStopSec"][0])


def test_the_bench_extra_exists() -> None:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert any(r.startswith("scikit-learn") for r in project["optional-dependencies"]["bench"])


_PARSE_ONLY = """
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed()
argparse.ArgumentParser.parse_args = parse_only
results = {}
for text in json.loads(sys.argv[1]):
    script, *args = text.split()[1:]
    sys.argv = [script, *args]
    sys.path[0] = script.rsplit("/", 1)[0]
    try:
        runpy.run_path(script, run_name="__main__")
        results[text] = "ran without parsing its arguments"
    except Parsed:
        results[text] = "ok"
    except SystemExit as error:
        results[text] = f"exit {error.code}"
print(json.dumps(results))
"""


def test_benchmark_commands_are_accepted_by_their_scripts() -> None:
    texts = [c.text for c in all_commands() if c.text.startswith("python benches/")]

    result = subprocess.run(
        [sys.executable, "-c", _PARSE_ONLY, json.dumps(texts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    verdicts = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(texts) >= 10
    assert {t: v for t, v in verdicts.items() if v != "ok"} == {}, result.stderr


def test_every_benchmark_script_is_in_the_benchmarks_doc() -> None:
    doc = (DOCS / "benchmarks.md").read_text(encoding="utf-8")

    assert [p.name for p in sorted((ROOT / "benches").glob("*.py")) if p.name not in doc] == []
