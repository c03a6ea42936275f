"""slurm/train.sbatch and slurm/eval.sbatch on a real one-node SLURM (munged, slurmctld, slurmd on this machine,
see _slurm.py): a CPU run completes with a checkpoint; a second one gets USR1 mid-run, checkpoints, requeues
itself, and its restart resumes from that step; eval.sbatch evaluates with 2 srun tasks and matches a
1-process evaluation of the same checkpoint."""
import json
import os
import subprocess
import sys
import time

import pytest

import _slurm
from _procs import clean_env
from conftest import REPO

MISSING = _slurm.missing()
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the SLURM tests, but {MISSING} are not installed (.ci/run installs them)")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"no SLURM here ({', '.join(MISSING)}): .ci/run installs it")

# A CPU job on the test node: no GPUs, 2 ranks on the node through the deepspeed launcher, the tiny model.
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=2", "--ntasks-per-node=1", "--time=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = _slurm.Cluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield c
    c.stop()


def job_env(cluster, shards, out, **extra):
    env = dict(cluster.env, DS_ACCELERATOR="cpu", PYTHON=sys.executable, RANKS_PER_NODE="2",
               TRAIN_SHARDS=str(shards / "train-{000000..000003}.tar"), VAL_SHARDS=str(shards / "val-000000.tar"),
               OUTPUT_DIR=str(out), EXP_NAME="run", DS_CONFIG=os.path.join(REPO, "ds_configs", "cpu_fp32.json"),
               PRESET="demo")
    env.update(extra)
    return env


def submit(cluster, script, env, *opts) -> str:
    """sbatch with `env` as the job's environment (sbatch exports the submitter's environment by default)."""
    out = os.path.join(env["OUTPUT_DIR"], "slurm-%j.out")
    os.makedirs(env["OUTPUT_DIR"], exist_ok=True)
    p = subprocess.run(["sbatch", "--parsable", f"--output={out}", *opts, os.path.join(REPO, "slurm", script)],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout.strip().split(";")[0]


TRAIN_ARGS = ("--num_frames 4 --batch_size 4 --num_workers 1 --log_step 1 --stochastic_trials 3 "
              "--save_every_steps 1000")


def test_train_job_completes_with_a_checkpoint_and_does_not_requeue(cluster, synthetic_shards, tmp_path):
    env = job_env(cluster, synthetic_shards, tmp_path, TRAIN_ARGS=TRAIN_ARGS + " --max_steps 6")
    job = submit(cluster, "train.sbatch", env, *CPU_JOB)
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=600)
    run = tmp_path / "run"
    log = run / "logs" / f"train-{job}-restart0.log"
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.exists() else cluster.logs()
    assert info["Restarts"] == "0"
    assert json.loads((run / "summary.json").read_text())["step"] == 6
    assert (run / "checkpoints" / "latest").read_text() == "step6"
    assert "finished with status 0" in log.read_text() and "requeued" not in log.read_text()
    assert "deepspeed.launcher.runner --num_gpus 2" in log.read_text()  # one node: the local launcher
    assert json.loads((run / "summary.json").read_text())["world"] == 2  # 2 ranks on the node, as asked


def test_usr1_checkpoints_requeues_and_the_restart_resumes(cluster, synthetic_shards, tmp_path):
    env = job_env(cluster, synthetic_shards, tmp_path, VAL_SHARDS="",
                  TRAIN_ARGS=TRAIN_ARGS + " --max_steps 60 --num_epochs 20")
    job = submit(cluster, "train.sbatch", env, *CPU_JOB)
    run = tmp_path / "run"
    t = time.time()
    while not (run / "train.log").exists() or "step 3 " not in (run / "train.log").read_text():
        assert time.time() - t < 300, cluster.logs()
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.logs()
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # the ranks save at the end of their step, the job requeues itself: back to PENDING with one restart
    info = cluster.wait(job, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    first = run / "logs" / f"train-{job}-restart0.log"
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", first.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and 3 <= summary["step"] < 60
    assert (run / "checkpoints" / "latest").read_text() == f"step{summary['step']}"
    assert "requeued" in first.read_text()

    # Skip Slurm's requeue delay, but not too soon: slurmd revokes the killed attempt's credential with a 1 s
    # clock, and a relaunch within that second is refused ("Job credential revoked").
    t = time.time()
    while cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() != "idle":
        assert time.time() - t < 120, cluster.logs()
        time.sleep(0.5)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    second = run / "logs" / f"train-{job}-restart1.log"
    assert info["JobState"] == "COMPLETED", second.read_text()[-3000:] if second.exists() else cluster.logs()
    assert info["Restarts"] == "1"  # the normal end did not requeue again
    assert json.loads((run / "summary.json").read_text())["step"] == 60
    assert f"resumed from {run / 'checkpoints'} at step {summary['step']}" in (run / "train.log").read_text()
    assert "finished with status 0" in second.read_text()


def test_eval_job_with_two_srun_tasks_matches_one_process(cluster, synthetic_shards, tmp_path):
    env = job_env(cluster, synthetic_shards, tmp_path, TRAIN_ARGS=TRAIN_ARGS + " --max_steps 4")
    job = submit(cluster, "train.sbatch", env, *CPU_JOB)
    assert cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)["JobState"] == "COMPLETED"
    run = tmp_path / "run"
    test = str(synthetic_shards / "test-{000000..000001}.tar")
    eval_args = "--num_workers 1 --eval_batch_size 2 --stochastic_trials 4"
    env = dict(env, CHECKPOINT=str(run), TEST_SHARDS=test, EVAL_ARGS=eval_args, LAUNCH_MODE="srun",
               RESULTS=str(tmp_path / "srun.json"))
    job = submit(cluster, "eval.sbatch", env, "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
                 "--time=20")
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=600)
    out = tmp_path / f"slurm-{job}.out"
    assert info["JobState"] == "COMPLETED", out.read_text()[-3000:] if out.exists() else cluster.logs()
    two = json.loads((tmp_path / "srun.json").read_text())
    assert two["world_size"] == 2
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), "--checkpoint", str(run),
                        "--test_shards", test, *eval_args.split(), "--results", str(tmp_path / "one.json")],
                       env=clean_env(DS_ACCELERATOR="cpu"), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    for d in ("t2v", "v2t"):
        assert two[d] == one[d]
    assert two["num_texts"] == one["num_texts"] > 0 and one["world_size"] == 1
