"""A Python with only what the lent GPU machine's image has, for the CPU rehearsal of the GPU run.

`image_python(root)` makes, under `root`, a virtual environment of this Python's base interpreter with no
packages of its own, and a folder `image-site-packages` that it sees: links to the installed files of
benchmarks.gpu_bundle.IMAGE_PACKAGES and of what they require, nothing else. Run there, the GPU run finds
the standard library, the image's packages, the project (on PYTHONPATH, as gpu_run puts it) and what it
installs from the bundle: any other import fails as it would on that machine, by not being there.

A `sitecustomize` in that folder records, in every process started with VTAG_IMAGE_RECORD set (the check's
`vtag` subprocesses, torchrun and DataLoader workers too), the top-level modules it imported from the
folder named by VTAG_IMAGE_RECORD_VENV: what the bundle had to bring.
"""

import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from benchmarks.gpu_bundle import IMAGE_PACKAGES, normalized

RECORDER = """
import atexit, json, os, sys

def _record(path=os.environ.get("VTAG_IMAGE_RECORD"), venv=os.environ.get("VTAG_IMAGE_RECORD_VENV", "")):
    venv = os.path.realpath(venv)
    with open(path, "a") as out:
        for name, module in list(sys.modules.items()):
            where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", []) or []), None)
            if "." not in name and where and os.path.realpath(where).startswith(venv + os.sep):
                out.write(json.dumps({"module": name, "origin": where, "pid": os.getpid()}) + "\\n")

if os.environ.get("VTAG_IMAGE_RECORD"):
    atexit.register(_record)
"""


def image_distributions(roots=IMAGE_PACKAGES) -> set[str]:
    """The image's packages and what they require (extras left out), as installed here."""
    seen, todo = set(), [normalized(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        todo += [normalized(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requires if "extra ==" not in r]
    return seen


def image_python(root: Path) -> Path:
    """The python of an environment that sees the image's packages alone; made once under `root`."""
    python = root / "image" / "bin" / "python"
    if python.exists():
        return python
    site = root / "image-site-packages"
    site.mkdir(parents=True, exist_ok=True)
    for name in sorted(image_distributions()):
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # required by an image package, not installed with ours (nvidia-*)
            continue
        installed = Path(dist.locate_file(""))
        for top in sorted({f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}):
            link = site / top
            if not link.exists() and (installed / top).exists():
                link.symlink_to(installed / top)
    (site / "sitecustomize.py").write_text(RECORDER)
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root / "image")], check=True)
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    (Path(purelib) / "image.pth").write_text(f"{site}\n")
    return python


def recorded_modules(record: Path) -> dict[str, str]:
    """{top-level module: where it was imported from} over every process that wrote to `record`."""
    if not record.exists():
        return {}
    return {row["module"]: row["origin"] for row in map(json.loads, record.read_text().splitlines())}
