"""Regenerate the Python code for proto/ into metis_async/ (the folders mirror each other).

Run with the pinned tools from the `dev` extra: `python scripts/gen_proto.py`. `--check` regenerates
into a temporary folder and exits 1 when the committed code differs (used by the drift test).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PINNED_GRPCIO_TOOLS = "1.85.1"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on every .proto under proto/, writing into `out_dir`."""
    import grpc_tools
    from grpc_tools import protoc  # imported here: only developers need grpcio-tools

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    plugin = Path(sys.executable).parent / "protoc-gen-mypy"
    if not plugin.exists():
        found = shutil.which("protoc-gen-mypy")
        if found is None:
            raise SystemExit("protoc-gen-mypy not found: pip install mypy-protobuf")
        plugin = Path(found)
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={plugin}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [p.relative_to(PROTO_ROOT).with_suffix("") for p in protos]


def generated_files(out_dir: Path, stems: list[Path]) -> list[Path]:
    names = []
    for stem in stems:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            names.append(stem.parent / (stem.name + suffix))
    return [n for n in names if (out_dir / n).exists()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code drifted")
    args = parser.parse_args()
    try:
        from importlib.metadata import version

        found = version("grpcio-tools")
    except Exception:  # missing package: reported below
        found = "missing"
    if found != PINNED_GRPCIO_TOOLS:
        print(f"grpcio-tools {PINNED_GRPCIO_TOOLS} required, found {found}", file=sys.stderr)
        return 2
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stems = generate(Path(tmp))
        drifted = [
            str(f)
            for f in generated_files(Path(tmp), stems)
            if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
        ]
    if drifted:
        print("generated code differs from proto/: " + ", ".join(drifted), file=sys.stderr)
        print("run: python scripts/gen_proto.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
