"""Helpers of tools/gpu_check.sh and tools/gpu_setup.sh. Standard library only: the dry run and the wheel check
run where torch is absent.

    python3 tools/gpu_check.py wheels --dir .whl --platform manylinux_2_28_x86_64 ... NAME==VERSION ...
    python3 tools/gpu_check.py record OUT/bench.json STEP RESULT SECONDS TIMEOUT LOG [PART.json]

`wheels` checks a carried wheel folder against gpu_setup.sh's pins: every pinned package there once, at its
version, each installable on CPython 3.12 x86_64 Linux, nothing else, at most 64 MiB in all (what one call to a
lent GPU machine carries, beside the tree). Each problem is one line naming the fix; exit status 1 if any.
`record` adds one step's result (and the figures its benchmark wrote to PART.json) to the run's JSON file, after
each step, so a run stopped half way keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MAX_MIB = 64
PYTHON = (3, 12)
PYTHON_TAGS = {"py3", f"py3{PYTHON[1]}", f"cp3{PYTHON[1]}"}
ABI_TAGS = {"none", "abi3", f"cp3{PYTHON[1]}"}


def normalize(name: str) -> str:
    """PEP 503: wheel file names spell megatron-core as megatron_core."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installable(python: str, abi: str, platform: str, platforms: set[str]) -> bool:
    """Whether any tag triple of a wheel installs on CPython 3.12 for one of `platforms` (or on any platform)."""
    for py in python.split("."):
        stable = abi == "abi3" and re.fullmatch(r"cp3(\d+)", py) and int(py[3:]) <= PYTHON[1]
        if (py in PYTHON_TAGS or stable) and abi in ABI_TAGS:
            if any(p == "any" or p in platforms for p in platform.split(".")):
                return True
    return False


def wheel_problems(folder: Path, pins: list[str], platforms: set[str]) -> tuple[list[str], str]:
    """(one line per problem, a one-line description of the folder)."""
    shown = f"{folder}/"
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    if not wheels:
        return [f"no {shown} (or no wheels in it): run tools/gpu_setup.sh download where PyPI is reachable, "
                f"and carry {shown} along"], ""
    wanted = {}
    for pin in pins:
        name, _, version = pin.partition("==")
        wanted[normalize(name)] = version
    problems, found = [], {}
    for wheel in wheels:
        parts = wheel.name[: -len(".whl")].split("-")
        if len(parts) not in (5, 6):
            problems.append(f"{wheel.name}: not a wheel file name (name-version-python-abi-platform.whl): remove it")
            continue
        name, version, (python, abi, platform) = normalize(parts[0]), parts[1], parts[-3:]
        found.setdefault(name, []).append((version, wheel.name))
        if name not in wanted:
            problems.append(f"{wheel.name}: not in tools/gpu_setup.sh's PACKAGES: remove it, or pin it there")
        elif not installable(python, abi, platform, platforms):
            problems.append(f"{wheel.name}: not installable on CPython 3.12 x86_64 Linux (tags {python}-{abi}-"
                            f"{platform}): remove it and run tools/gpu_setup.sh download")
    for name, version in wanted.items():
        have = found.get(name, [])
        if len(have) > 1:
            problems.append(f"{name} {len(have)} times in {shown} ({', '.join(f for _, f in have)}): one version "
                            f"each, or the install stops: remove {shown} and run tools/gpu_setup.sh download")
        elif not have:
            problems.append(f"{name}=={version} missing from {shown}: run tools/gpu_setup.sh download")
        elif have[0][0] != version:
            problems.append(f"{have[0][1]}: tools/gpu_setup.sh pins {name}=={version}: run tools/gpu_setup.sh "
                            f"download")
    size = sum(w.stat().st_size for w in wheels)
    mib = size / 2**20
    if mib > MAX_MIB:
        problems.append(f"{shown} holds {mib:.1f} MiB, over the {MAX_MIB} MiB a GPU machine's call carries: "
                        f"drop a package from tools/gpu_setup.sh's PACKAGES")
    return problems, f"{shown}: {len(wheels)} wheels, {mib:.1f} MiB ({size} bytes) of {MAX_MIB} MiB"


def check_wheels(args) -> int:
    problems, summary = wheel_problems(Path(args.dir), args.pins, set(args.platform))
    for line in problems:
        print(f"gpu_check: {line}", file=sys.stderr)
    if not problems:
        print(f"{summary}, every package of tools/gpu_setup.sh once, for CPython 3.12 x86_64")
    return 1 if problems else 0


def record(args) -> int:
    path = Path(args.json)
    run = json.loads(path.read_text()) if path.exists() else {"steps": {}}
    run["steps"][args.step] = dict(result=args.result, seconds=args.seconds, timeout=args.timeout, log=args.log)
    if args.part and Path(args.part).is_file():
        run[args.step] = json.loads(Path(args.part).read_text())
    path.write_text(json.dumps(run, indent=1) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    wheels = verbs.add_parser("wheels", help="check a carried wheel folder against the pins")
    wheels.add_argument("--dir", default=".whl")
    wheels.add_argument("--platform", action="append", default=[], help="a platform tag download asks for")
    wheels.add_argument("pins", nargs="+", metavar="NAME==VERSION")
    wheels.set_defaults(run=check_wheels)
    rec = verbs.add_parser("record", help="add one step's result to the run's JSON file")
    for name in ("json", "step", "result"):
        rec.add_argument(name)
    rec.add_argument("seconds", type=int)
    rec.add_argument("timeout", type=int)
    rec.add_argument("log")
    rec.add_argument("part", nargs="?", help="the JSON file the step's benchmark wrote")
    rec.set_defaults(run=record)
    args = parser.parse_args()
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
