"""Generate kvmesh's protobuf/gRPC stubs into kvmesh/v1/ (never edit them by hand).

    python protos/generate.py           # regenerate
    python protos/generate.py --check   # exit 1 when the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "kvmesh" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _protos() -> list[Path]:
    return sorted((PROTO_ROOT / "kvmesh" / "v1").glob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every kvmesh proto; return the generated files."""
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in _protos()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = out_root / "kvmesh" / "v1"
    return sorted(p for p in out.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _committed() -> list[Path]:
    return sorted(p for p in OUT_PACKAGE.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when stubs are stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            committed = {p.name: p for p in _committed()}
            stale = [
                f.name
                for f in fresh
                if f.name not in committed or not filecmp.cmp(f, committed[f.name], shallow=False)
            ]
            extra = sorted(set(committed) - {f.name for f in fresh})
            if stale or extra:
                print(f"stale generated stubs: {stale + extra}; run python protos/generate.py")
                return 1
            print(f"{len(fresh)} generated stubs are up to date")
            return 0
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for old in _committed():
            old.unlink()
        for f in fresh:
            shutil.copyfile(f, OUT_PACKAGE / f.name)
        print(f"wrote {len(fresh)} files to {OUT_PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
