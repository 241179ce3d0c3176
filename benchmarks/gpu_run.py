"""The GPU check on a machine as it is lent: its own Python, no network, the bundle carried beside the code.

    make gpu-check GPU_PYTHON=python3 GPU_OUT=$OUT     # python3 -m benchmarks.gpu_run --out-dir $OUT
    python3 -m benchmarks.gpu_run [--bundle .gpu-bundle] [--venv DIR] [--out-dir DIR] [--budget-s 540] [CHECK OPTIONS]

In the repository's root, on the Python that has CUDA's torch:
1. a virtual environment (default: a fresh one under /tmp) that sees this Python's own site packages;
2. the bundle (`make gpu-bundle`, benchmarks/gpu_bundle.py) installed into it with pip, `--no-index`;
3. one line each for Python, torch, CUDA, the GPUs and memory, found from inside that environment; a module
   the check needs that is still missing stops the run there, in one line naming it;
4. benchmarks.gpu_check in that environment, with what is left of the budget (9 minutes in all by default),
   writing gpu-check.json and gpu-check.txt into --out-dir. Options it does not know go to the check.
Up to step 4 it needs the standard library only. Exit status: the check's, or 3 when the set-up failed.
"""

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from benchmarks.gpu_bundle import BUNDLE_MODULES, REPO

EXIT_SETUP = 3
# What the check imports from the image (the bundle brings the rest: BUNDLE_MODULES).
IMAGE_MODULES = {"torch": "torch", "numpy": "numpy", "pyarrow": "pyarrow", "matplotlib": "matplotlib"}


class SetupError(RuntimeError):
    pass


def site_dirs() -> list[str]:
    """This interpreter's site-packages folders: the image's packages, even where its Python is itself a venv
    (a venv made from one sees the base Python's, not its, with --system-site-packages)."""
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]


def make_venv(venv: Path) -> Path:
    """A new virtual environment at `venv` whose Python also sees this one's packages, after its own; returns
    its python. No pip in it: this Python's pip installs into it (ensurepip is not on every image)."""
    result = subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], capture_output=True)
    if result.returncode != 0:
        raise SetupError(f"python -m venv {venv} failed: {result.stderr.decode(errors='replace').strip()}")
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True).strip())  # fmt: skip
    (site / "_vtag_image.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs()))
    return python


def install_bundle(python: Path, bundle: Path) -> list[str]:
    """Install the bundle's wheels into `python`'s environment with pip, from the folder alone."""
    wheels = sorted(bundle.glob("*.whl"))
    if not wheels:  # the check below names any module this leaves missing
        print(
            f"gpu-run: no wheels in {bundle} (`make gpu-bundle` where there is a network): this Python's packages only"
        )
        return []
    if importlib.util.find_spec("pip") is None:
        raise SetupError(f"{sys.executable} has no pip to install {bundle} with")
    target = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('platlib'))"], text=True).strip()  # fmt: skip
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
        "--no-deps", "--no-cache-dir", "--target", target, *map(str, wheels),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SetupError(f"pip install --no-index of {bundle} failed: {last}")
    return [w.name for w in wheels]


def preflight(device: str) -> int:
    """Run inside the new environment: one line per thing found; a missing or broken module ends it in one line."""
    needed = {**IMAGE_MODULES, **BUNDLE_MODULES}
    for dist, module in needed.items():
        where = "the bundle" if dist in BUNDLE_MODULES else "the image"
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            print(f"gpu-run: missing module {module} (package {dist}, expected from {where})", file=sys.stderr)
            return EXIT_SETUP
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install is a finding, in one line
            print(f"gpu-run: cannot import {module} ({dist}): {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_SETUP
    import torch  # only now: everything it and the check need is there

    from benchmarks.gpu_bundle import locked_versions

    locked = locked_versions().get("torch", "?")
    print(f"python: {sys.version.split()[0]} ({sys.executable})")
    print(f"torch: {torch.__version__} (the lock pins {locked}), CUDA build {torch.version.cuda or 'none'}")
    cuda = torch.cuda.is_available()
    print(f"cuda: {'available' if cuda else 'not available'}, cuDNN {torch.backends.cudnn.version() if cuda else '-'}")
    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())] if cuda else []
    print("gpus: " + ("; ".join(f"{g.name} {g.total_memory / 2**30:.1f} GiB" for g in gpus) or "none"))
    print(f"memory: {_host_memory_gib():.1f} GiB host, {os.cpu_count()} CPUs")
    print("modules: " + ", ".join(f"{m} {_version(d)}" for d, m in needed.items()))
    if device.startswith("cuda") and not cuda:
        print("gpu-run: --device cuda but torch sees no CUDA GPU here", file=sys.stderr)
        return EXIT_SETUP
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _host_memory_gib() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return float("nan")
    return kib / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / ".gpu-bundle")
    parser.add_argument("--venv", type=Path, help="where to make the environment (default: a new folder in /tmp)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "gpu-check")
    parser.add_argument("--budget-s", type=float, default=540, help="the whole run, set-up included (default 540)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preflight", action="store_true", help=argparse.SUPPRESS)  # step 3, in the new environment
    args, check_args = parser.parse_known_args(argv)
    if args.preflight:
        return preflight(args.device)
    started = time.monotonic()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="vtag-gpu-venv-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        print(f"gpu-run: environment {venv} from {sys.executable} (Python {sysconfig.get_python_version()})")
        python = make_venv(venv)
        wheels = install_bundle(python, args.bundle)
        print(f"gpu-run: installed {len(wheels)} wheels from {args.bundle} with --no-index")
    except (SetupError, OSError, subprocess.CalledProcessError) as exc:
        print(f"gpu-run: {exc}", file=sys.stderr)
        return EXIT_SETUP
    sys.stdout.flush()
    check = subprocess.run([str(python), "-m", "benchmarks.gpu_run", "--preflight", "--device", args.device], env=env, cwd=REPO)  # fmt: skip
    if check.returncode != 0:
        return check.returncode
    budget = args.budget_s - (time.monotonic() - started)
    command = [str(python), "-m", "benchmarks.gpu_check", "--device", args.device, "--out-dir", str(args.out_dir)]
    return subprocess.run([*command, "--budget-s", f"{budget:.0f}", *check_args], env=env, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
