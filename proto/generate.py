"""Regenerates the Python code of the twopc wire API from proto/ into twopc/api/.

    python proto/generate.py            # rewrite twopc/api/
    python proto/generate.py --check    # exit 1 if twopc/api/ is stale

protoc writes imports that follow the .proto path (``from twopc.v1 import twopc_pb2``); they are
rewritten to the package the code lives in, so the generated package needs nothing on sys.path.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
SOURCES = ["twopc/v1/twopc.proto", "twopc/v1/admin.proto", "twopc/chaos/v1/chaos.proto"]
TARGET = ROOT / "twopc" / "api"
PACKAGE = "twopc.api"
INIT = '"""Generated from proto/twopc/ by proto/generate.py. Do not edit."""\n'


def generate(target: Path) -> None:
    """Writes the generated modules of every source into ``target``, replacing what was there."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        bin_dir = Path(sys.executable).parent
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
                f"--mypy_out={out}",
                f"--mypy_grpc_out={out}",
                *SOURCES,
            ],
            check=True,
            capture_output=True,
        )
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        (target / "__init__.py").write_text(INIT)
        for source in SOURCES:
            module_dir = out / Path(source).parent
            dotted = ".".join(Path(source).parent.parts)
            for produced in sorted(module_dir.iterdir()):
                text = produced.read_text()
                text = text.replace(f"from {dotted} import", f"from {PACKAGE} import")
                (target / produced.name).write_text(text)


def stale_files(target: Path) -> list[str]:
    """Names of the files in ``target`` that differ from a fresh generation (empty when current)."""
    with tempfile.TemporaryDirectory() as scratch:
        fresh = Path(scratch) / "api"
        generate(fresh)
        comparison = filecmp.dircmp(fresh, target, ignore=["__pycache__"])
        names = comparison.left_only + comparison.right_only
        _, mismatch, errors = filecmp.cmpfiles(
            fresh, target, comparison.common_files, shallow=False
        )
        return sorted(names + mismatch + errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    if args.check:
        stale = stale_files(TARGET)
        if stale:
            print("stale generated code: " + ", ".join(stale) + "; run: python proto/generate.py")
            return 1
        print("generated code is current")
        return 0
    generate(TARGET)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
