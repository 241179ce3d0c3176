"""The offline bundle for the lent GPU machine: wheels of what the GPU check imports beyond that machine's image.

    make gpu-bundle                                    # python -m benchmarks.gpu_bundle --out .gpu-bundle
    python -m benchmarks.gpu_bundle --out DIR [--python-version 3.12]

The lent machine has no network and its own Python (3.12, torch with CUDA, numpy, pyarrow, pandas, matplotlib,
pyyaml: measured on one, issue 24). `benchmarks/gpu_run.py` installs this folder there with `--no-index`. It
holds CPython manylinux x86_64 wheels of BUNDLE_PACKAGES at the versions constraints.txt locks, and nothing
the image has. The standard library only: it runs on any Python with pip, and gpu_run and the tests read its
lists.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
# On the lent machine's image (distribution names), with what they require: the check takes these from there.
# pip too: it installs the bundle there.
IMAGE_PACKAGES = ("torch", "numpy", "pyarrow", "pandas", "matplotlib", "PyYAML", "pip")
# What the check's import closure needs beyond the image, {distribution: the module it is imported as}
# (tests/test_gpu_check.py proves it covers the closure): the database layer, migrations and their
# templates, TFRecord checksums, each video's content fingerprint, tf.train.Example decoding, and the
# progress bar the CLI's training imports. protobuf, tqdm and xxhash are on the image too, at versions
# nobody has read: the locked ones travel (0.5 MiB) so that the run uses what the tests ran.
BUNDLE_MODULES = {
    "SQLAlchemy": "sqlalchemy",
    "alembic": "alembic",
    "Mako": "mako",
    "google-crc32c": "google_crc32c",
    "xxhash": "xxhash",
    "protobuf": "google.protobuf",
    "tqdm": "tqdm",
}
BUNDLE_PACKAGES = tuple(BUNDLE_MODULES)
MAX_BYTES = 40 * 2**20
# manylinux tags pip must be told one by one (it matches each exactly), newest glibc first.
PLATFORMS = tuple(f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)) + (
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


class BundleError(RuntimeError):
    pass


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them (SQLAlchemy == sqlalchemy, google_crc32c == google-crc32c)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(constraints: Path = CONSTRAINTS) -> dict[str, str]:
    """{normalized name: version} of the `name==version` pins of pyproject.toml's dependencies (torch is pinned
    there alone) and constraints.txt's lines."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *constraints.read_text().splitlines()]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[normalized(name.strip())] = version.strip()
    return pins


def requirements(constraints: Path = CONSTRAINTS) -> list[str]:
    """BUNDLE_PACKAGES pinned as the lock file pins them; a package the lock does not name is a bug here."""
    pins = locked_versions(constraints)
    missing = [name for name in BUNDLE_PACKAGES if normalized(name) not in pins]
    if missing:
        raise BundleError(f"{constraints} pins no version of {', '.join(missing)}")
    return [f"{name}=={pins[normalized(name)]}" for name in BUNDLE_PACKAGES]


def wheel_distribution(path: Path) -> str:
    """The normalized distribution name of a wheel file (PEP 427: name-version-...whl)."""
    return normalized(path.name.split("-", 1)[0])


def build(out: Path, python_version: str = "3.12", constraints: Path = CONSTRAINTS) -> list[Path]:
    """Download the bundle's wheels for CPython `python_version` into `out`, replacing it whole only once every
    wheel is there (a failed download leaves the old bundle). Returns the wheels."""
    major, minor = python_version.split(".")
    pinned = requirements(constraints)
    out = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version", python_version,
            "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none",
            *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
            "--dest", str(staging), *pinned,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BundleError(f"pip download failed for {' '.join(pinned)}: {result.stderr.strip()[-2000:]}")
        wheels = sorted(staging.glob("*.whl"))
        got = {wheel_distribution(w) for w in wheels}
        lacking = [r for r in pinned if normalized(r.split("==")[0]) not in got]
        if lacking or len(wheels) != len(pinned):
            raise BundleError(f"pip download gave {[w.name for w in wheels]} for {pinned}")
        size = sum(w.stat().st_size for w in wheels)
        if size > MAX_BYTES:
            raise BundleError(f"the bundle is {size / 2**20:.1f} MiB, over its {MAX_BYTES / 2**20:.0f} MiB")
        (staging / "requirements.txt").write_text("".join(f"{r}\n" for r in pinned))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the lent machine's CPython (default 3.12)")
    args = parser.parse_args(argv)
    try:
        wheels = build(args.out, args.python_version)
    except BundleError as exc:
        print(f"gpu-bundle: {exc}", file=sys.stderr)
        return 1
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:6.2f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{total / 2**20:6.2f} MiB  in {args.out} ({len(wheels)} wheels, at most {MAX_BYTES / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
