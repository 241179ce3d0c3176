"""The GPU run rehearsed on the CPU as the lent machine starts it (issue 24), every commit.

A Python that sees only the image's packages (tests/support/gpu_image.py), no network (a network namespace of
its own where this machine allows one), the bundle built as `make gpu-bundle` builds it for this Python:
`python -m benchmarks.gpu_run` makes its environment, installs the bundle with --no-index, checks it, and
runs the check's CPU mode at small sizes, the product path (synth -> ingest -> train -> evaluate -> infer)
included. The same bundle for the lent machine's CPython 3.12 must cover what that run imported and fit
in 40 MiB.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

import pytest

from benchmarks import gpu_bundle
from benchmarks.gpu_run import EXIT_SETUP, IMAGE_MODULES
from tests.support.env import REPO
from tests.support.gpu_image import image_python, recorded_modules

VIDEOS = 64  # the product path's training videos: 4 shards of 16, and a validate shard of 16
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _offline() -> list[str]:
    """A prefix that runs a command with no network but loopback (torchrun's rendezvous), where allowed."""
    probe = ["unshare", "--net", "sh", "-c", "ip link set lo up"]
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "offline"]
    return []


def _gpu_run(python: Path, bundle: Path, root: Path, *check_args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VTAG_") and k != "PYTHONPATH"}
    env.update(VTAG_HOME=str(root / "home"), VTAG_IMAGE_RECORD=str(root / "record.jsonl"))
    env["VTAG_IMAGE_RECORD_VENV"] = str(root / "venv")
    command = [str(python), "-m", "benchmarks.gpu_run", "--bundle", str(bundle), "--venv", str(root / "venv")]
    command += ["--out-dir", str(root / "out"), "--device", "cpu", *check_args]
    return subprocess.run(_offline() + command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return image_python(tmp_path_factory.mktemp("gpu-image"))


@pytest.fixture(scope="module")
def rehearsal(image, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-rehearsal")
    gpu_bundle.build(root / "bundle", THIS_PYTHON)
    result = _gpu_run(image, root / "bundle", root, "--preset", "small", "--batch-size", "4", "--steps", "2", "--videos", str(VIDEOS))  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((root / "out" / "gpu-check.json").read_text())
    return result, report, (root / "out" / "gpu-check.txt").read_text(), recorded_modules(root / "record.jsonl"), root


def test_cpu_rehearsal_runs_the_product_path_with_the_image_and_the_bundle_alone(rehearsal):
    result, report, summary, modules, root = rehearsal
    # what it found, one line each, from inside the new environment
    lines = result.stdout.splitlines()
    for prefix in ("python: ", "torch: ", "cuda: not available", "gpus: none", "memory: ", "modules: "):
        assert any(line.startswith(prefix) for line in lines), (prefix, result.stdout[:2000])
    assert f"python: {THIS_PYTHON}" in result.stdout and str(root / "venv") in result.stdout
    assert "Traceback" not in result.stderr
    # the product path: each step a vtag command that succeeded, with its figures
    product = report["product"]
    for step in ("synth", "synth validate", "ingest", "train", "evaluate", "infer"):
        assert product[step]["returncode"] == 0, (step, product[step])
    assert product["train"]["steps"] >= 1 and product["train"]["videos_per_s"] > 0
    assert product["train"]["precision"] == "fp32 on cpu"
    assert set(product["evaluate"]["metrics"]) == {"hit_at_one", "perr", "gap", "map"}
    scored = VIDEOS + 16
    assert product["infer"]["videos"] == scored and product["infer"]["rows"] == scored * 20
    # every later section ran on the product path's Parquet and the small preset
    env = report["environment"]
    assert env["torch_is_locked"] and env["torch"].startswith(gpu_bundle.locked_versions()["torch"])
    for name, policy in report["training"]["policies"].items():
        assert policy["videos_per_s"] > 0 and policy["batch_size"] == 4, (name, policy)
    assert report["loader"]["1"]["videos_per_s"] > 0
    assert report["inference"]["videos_per_s"] > 0
    assert "Self CPU" in report["profile"]
    assert report["torchrun"]["returncode"] == 0, report["torchrun"]["output_tail"]
    # the summary says the same for a person
    assert re.search(r"^  vtag infer: exit 0, [\d.]+ s; 80 videos, 1,600 rows", summary, re.MULTILINE), summary
    assert "torch 2.13.0" in summary and "(the locked version)" in summary
    # what the bundle brought was imported from the environment it was installed into
    assert modules and all(origin.startswith(str(root / "venv")) for origin in modules.values())


def test_bundle_for_the_lent_machine_covers_what_the_run_imported_and_fits(rehearsal, tmp_path):
    _, _, _, modules, root = rehearsal
    # the distributions that brought the modules the rehearsal imported from its environment
    venv_dists = {}
    for dist in distributions(path=[str(p) for p in (root / "venv").glob("lib/python*/site-packages")]):
        for top in {f.parts[0] for f in dist.files or []}:
            venv_dists.setdefault(top, set()).add(gpu_bundle.normalized(dist.metadata["Name"]))
    needed = set().union(*(venv_dists[m] for m in modules))
    # google is a namespace: protobuf's and google-crc32c's modules are both under it or beside it
    assert needed == {gpu_bundle.normalized(name) for name in gpu_bundle.BUNDLE_PACKAGES}

    out = tmp_path / "bundle"
    made = subprocess.run(["make", "--no-print-directory", "gpu-bundle", f"GPU_BUNDLE={out}"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    assert 0 < total <= gpu_bundle.MAX_BYTES
    assert f"{total / 2**20:.2f} MiB  in {out}" in made.stdout
    locked = gpu_bundle.locked_versions()
    image = {gpu_bundle.normalized(name) for name in (*gpu_bundle.IMAGE_PACKAGES, *IMAGE_MODULES)}
    assert {gpu_bundle.wheel_distribution(w) for w in wheels} == needed and not needed & image
    for wheel in wheels:
        name, version, python_tag, abi, platform = wheel.name[: -len(".whl")].split("-")
        assert version == locked[gpu_bundle.normalized(name)], wheel.name
        assert python_tag in ("py3", "cp312") or abi == "abi3", wheel.name
        assert platform == "any" or ("manylinux" in platform and platform.endswith("x86_64")), wheel.name
    assert (out / "requirements.txt").read_text().split() == gpu_bundle.requirements()


def test_a_module_still_missing_stops_the_run_in_one_line(image, tmp_path):
    partial = tmp_path / "bundle"
    partial.mkdir()
    bundle = tmp_path / "full"
    gpu_bundle.build(bundle, THIS_PYTHON)
    for wheel in bundle.glob("*.whl"):
        if gpu_bundle.wheel_distribution(wheel) != "sqlalchemy":
            shutil.copy(wheel, partial)
    result = _gpu_run(image, partial, tmp_path)
    assert result.returncode == EXIT_SETUP
    assert result.stderr.strip().splitlines() == [
        "gpu-run: missing module sqlalchemy (package SQLAlchemy, expected from the bundle)"
    ]
    assert not (tmp_path / "out").exists()
