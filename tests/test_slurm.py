"""`snakemake --profile profiles/slurm` submits real SLURM jobs with each rule's resources.

Skips only when no SLURM controller answers (`sinfo`); .ci/run starts a single-node SLURM first."""
import re
import shutil
import subprocess

import pytest

from test_dag import copy_repo, sh


def slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(not slurm_up(), reason="no SLURM controller answers `sinfo`: SLURM is absent")]


def test_slurm_profile_runs_a_shard_through_sbatch(tmp_path):
    work = copy_repo(tmp_path)
    target = "artifacts/tiny/filter/kept/shakespeare.parquet"
    out = sh(["snakemake", "--profile", "profiles/slurm", target], work)
    log = out.stdout + out.stderr
    assert (work / target).is_file()
    assert log.count("has been submitted with SLURM jobid") == 2, log[-3000:]
    assert "mem_mb=4000" in log and "slurm_partition=debug" in log  # the filter rule's own resources
    # SLURM's own record of the filter job (kept MinJobAge seconds after it ends): done, with the rule's memory
    filter_job = re.findall(r"rule_filter/\S+/(\d+)\.log", log)[-1]
    record = sh(["scontrol", "show", "job", filter_job], work).stdout
    assert "JobState=COMPLETED" in record and "mem=4000M" in record, record
