"""The committed generated code matches proto/ (regenerated with the pinned grpcio-tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0, result.stderr


def test_handwritten_method_path_matches_the_service() -> None:
    from metis_async.client.runner import JOIN_METHOD as CLIENT_METHOD
    from metis_async.server import JOIN_METHOD as SERVER_METHOD
    from metis_async.v1 import controller_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Controller"]
    expected = f"/{service.full_name}/{service.methods_by_name['Join'].name}"
    assert CLIENT_METHOD == SERVER_METHOD == expected
