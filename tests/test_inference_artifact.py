"""Issue 25: inference reads weights, not training state; registration validates before it writes.

A registered version has an inference artifact (its config and weights, no optimizer state or history),
hashed and recorded like its checkpoint, which nights load memory-mapped (the tampered-artifact and
registered-before-0010 cases are in tests/test_integrity_inference.py). A file that is not a checkpoint is
refused in one line of ours before anything is copied.
"""

from pathlib import Path

import torch

from model import checkpoint
from model.evaluate import load_model
from storage.database import registry
from tasks import settings
from tasks.training import ensure_registered
from tests.support.cli import vtag
from tests.support.db import in_transaction


class Payload:  # what an unrestricted load would construct (and could run code from)
    pass


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def test_a_registered_version_has_an_artifact_of_its_weights_alone(tiny_checkpoint, db_url):
    version = in_transaction(db_url, registry.get_version, ensure_registered(db_url, tiny_checkpoint))
    artifact = Path(version["weights_uri"])
    assert artifact == Path(checkpoint.weights_uri(tiny_checkpoint)) and artifact.is_file()
    assert checkpoint.sha256_of(str(artifact)) == version["weights_sha256"]
    full, weights = (
        checkpoint.load(tiny_checkpoint),
        checkpoint.load_weights(str(artifact), sha256=version["weights_sha256"]),
    )
    assert (
        set(weights) == {"format", "config", "architecture", "model"} and weights["format"] == checkpoint.WEIGHTS_FORMAT
    )
    assert {"optimizer", "history"} <= set(full) and artifact.stat().st_size < Path(tiny_checkpoint).stat().st_size
    assert checkpoint.same_weights(weights["model"], full["model"])

    cpu = torch.device("cpu")
    from_artifact, config = load_model(
        version["checkpoint_uri"], cpu, weights=(str(artifact), version["weights_sha256"])
    )
    from_checkpoint, _ = load_model(version["checkpoint_uri"], cpu, sha256=version["checkpoint_sha256"])
    assert all(p.device.type == "cpu" for p in from_artifact.parameters())  # assigned, not left on the meta device
    assert checkpoint.same_weights(from_artifact.state_dict(), from_checkpoint.state_dict())

    # Registered again (another database): the artifact there is kept, being these weights.
    before = artifact.stat().st_mtime_ns
    assert ensure_registered(db_url, tiny_checkpoint) == version["version"]
    assert artifact.stat().st_mtime_ns == before


def test_a_file_that_is_not_a_checkpoint_is_one_line_and_nothing_is_written(tmp_path, sqlite_url):
    passwd = tmp_path / "etc" / "passwd"
    passwd.parent.mkdir()
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\n")
    hostile = tmp_path / "etc" / "model.pt"

    torch.save({"format": checkpoint.FORMAT, "model": Payload()}, hostile)
    registry_folder = Path(settings.default_models_uri()) / checkpoint.REGISTERED
    before = _files_under(registry_folder) | _files_under(passwd.parent)
    for path, reason in (
        (passwd, "is not a vtag checkpoint: not a PyTorch file ("),
        (hostile, "is not a vtag checkpoint: it holds Python objects besides tensors and plain data, refused"),
    ):
        result = vtag("infer", "--checkpoint", path, "--dry-run", "--db", sqlite_url)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"vtag infer: error: {path} {reason}"), line
        assert "weights_only" not in line and "Traceback" not in result.stderr  # no advice to load it unrestricted
    assert _files_under(registry_folder) | _files_under(passwd.parent) == before  # nothing copied, beside it or not
    assert not (passwd.parent / checkpoint.REGISTERED).exists()
    assert in_transaction(sqlite_url, registry.versions_with_latest_evaluation) == []
