"""Regenerate everything under generated/ from protos/, from scratch.

    python scripts/genprotos.py           # rewrite generated/
    python scripts/genprotos.py --check   # fail if generated/ differs from a fresh run

Outputs: *_pb2.py, *_pb2_grpc.py and *.pyi for every file under protos/, plus the descriptor
set Envoy's gRPC-JSON transcoder loads (generated/agentmesh.pb, with its imports so that
google.rpc.ErrorInfo can be rendered in error bodies). The google/* protos come from
googleapis-common-protos and grpcio-tools; they are also copied into build/third_party so that
buf lints against the very same files.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
GENERATED = ROOT / "generated"
THIRD_PARTY = ROOT / "build" / "third_party"
DESCRIPTOR_NAME = "agentmesh.pb"
# Types that only appear inside google.protobuf.Any (error details), so --include_imports alone
# would leave them out of the descriptor set.
EXTRA_DESCRIPTOR_INPUTS = ["google/rpc/error_details.proto", "google/rpc/status.proto"]


def _googleapis_root() -> Path:
    import google.api.annotations_pb2 as annotations

    return Path(annotations.__file__).resolve().parent.parent.parent


def _well_known_root() -> Path:
    return Path(str(resources.files("grpc_tools") / "_proto"))


def _copy_third_party() -> None:
    if THIRD_PARTY.exists():
        shutil.rmtree(THIRD_PARTY)
    src = _googleapis_root() / "google"
    for sub in ("api", "rpc"):
        dest = THIRD_PARTY / "google" / sub
        dest.mkdir(parents=True)
        for proto in (src / sub).glob("*.proto"):
            shutil.copy2(proto, dest / proto.name)


def _run_protoc(out: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    includes = [f"-I{PROTOS}", f"-I{_googleapis_root()}", f"-I{_well_known_root()}"]
    code = protoc.main(
        [
            "protoc",
            *includes,
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            *sources,
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed generating Python ({code})")
    code = protoc.main(
        [
            "protoc",
            *includes,
            "--include_imports",
            f"--descriptor_set_out={out / DESCRIPTOR_NAME}",
            *sources,
            *EXTRA_DESCRIPTOR_INPUTS,
        ]
    )
    if code != 0:
        sys.exit(f"protoc failed writing the descriptor set ({code})")
    for package_dir in {p.parent for p in out.rglob("*_pb2.py")}:
        d = package_dir
        while d != out:
            (d / "__init__.py").touch()
            d = d.parent


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only in {a.name if x else ''}{x}" for x in cmp.left_only]
    out += [f"missing {x}" for x in cmp.right_only]
    out += [f"differs {x}" for x in cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        out += [f"{name}/{line}" for line in _diff(Path(sub.left), Path(sub.right))]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ is stale")
    args = parser.parse_args()
    _copy_third_party()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _run_protoc(fresh)
        if args.check:
            problems = _diff(GENERATED, fresh) if GENERATED.exists() else ["generated/ missing"]
            if problems:
                print("generated/ is stale; run `make protos`:", *problems, sep="\n  ")
                sys.exit(1)
            print("generated/ is up to date")
            return
        if GENERATED.exists():
            shutil.rmtree(GENERATED)
        shutil.copytree(fresh, GENERATED)
    print(f"regenerated {GENERATED.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
