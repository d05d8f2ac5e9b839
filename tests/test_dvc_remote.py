"""A DVC remote shares artifacts between machines: build a cheap data stage, `dvc push` it to a local-directory
remote, and `dvc pull` in a fresh clone (no artifacts, no cache) restores every file byte for byte, after which
`dvc status` is clean and `dvc repro` runs nothing. An S3 remote is the same commands with an s3:// URL (README)."""
import re
from pathlib import Path

from stages import common
from test_dag import copy_repo, sh

STAGE = "ingest"  # the cheapest data stage: raw corpus -> normalized shards, a directory output of many files
OUT = Path("artifacts/tiny/ingest")


def file_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {str(p.relative_to(root)): common.sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_dvc_remote_round_trip_restores_artifacts_byte_for_byte(tmp_path):
    work, remote = copy_repo(tmp_path / "work"), tmp_path / "remote"
    sh(["dvc", "repro", STAGE], work)
    built = file_hashes(work / OUT)
    assert any(name.endswith(".parquet") for name in built) and any(name.endswith(".json") for name in built), built

    sh(["dvc", "remote", "add", "-d", "store", str(remote)], work)
    sh("git add dvc.lock .dvc/config .dvc/.gitignore && git -c user.email=t@t -c user.name=t commit -qm store", work)
    pushed = sh(["dvc", "push", STAGE], work).stdout
    assert re.search(r"\d+ files? pushed", pushed), pushed
    # content-addressed: one object per distinct file content (shards with equal bytes share one), plus the listing
    assert len([p for p in remote.rglob("*") if p.is_file()]) > len(set(built.values()))

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(work), str(clone)], tmp_path)
    assert not (clone / OUT).exists() and not (clone / ".dvc" / "cache").exists()
    sh(["dvc", "pull", STAGE], clone)
    assert file_hashes(clone / OUT) == built

    status = sh(["dvc", "status", STAGE], clone).stdout
    assert "Data and pipelines are up to date." in status, status
    cloud = sh(["dvc", "status", "--cloud", STAGE], clone).stdout
    assert "Cache and remote 'store' are in sync." in cloud, cloud
    mtimes = {p: p.stat().st_mtime_ns for p in (clone / OUT).rglob("*") if p.is_file()}
    repro = sh(["dvc", "repro", STAGE], clone).stdout
    assert "Running stage" not in repro and f"Stage '{STAGE}' didn't change, skipping" in repro, repro
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
