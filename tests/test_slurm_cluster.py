"""slurm/train.sbatch and slurm/eval.sbatch on a real SLURM of two nodes on this machine (munged, slurmctld and a
slurmd per node, see _slurm.py): a one-node CPU run completes with a checkpoint; a two-node run through DeepSpeed's
launcher (over srun) gets USR1 mid-run, checkpoints on both nodes, requeues itself, and its restart resumes and
trains the weights that a two-node run of srun tasks trains uninterrupted, bit for bit; eval.sbatch evaluates
with 2 srun tasks and matches a 1-process evaluation of the same checkpoint."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

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
               PRESET="demo", TMASS_MASTER_ADDR="127.0.0.1")
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


# Two nodes of one rank each; the nodes are this machine's two slurmds.
TWO_NODES = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--ntasks-per-node=1", "--time=20"]


def rank_nodes(tag: str) -> set[str]:
    """The SLURM node (SLURMD_NODENAME) of every live training process whose command line names `tag`."""
    nodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if "launch/train.py" not in cmd or tag not in cmd or "deepspeed.launcher" in cmd \
                    or os.path.basename(cmd.split()[0]) == "srun":  # the ranks, not their launchers
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e)
        except OSError:
            continue
        nodes.add(env.get(b"SLURMD_NODENAME", b"?").decode())
    return nodes


def wait_for_step(cluster, job, run, step, nodes):
    """Until the run has logged `step`; meanwhile, the nodes its ranks run on are added to `nodes`."""
    t = time.time()
    while not (run / "train.log").exists() or f"step {step} " not in (run / "train.log").read_text():
        assert time.time() - t < 300, cluster.logs()
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), cluster.logs()
        nodes |= rank_nodes(str(run.parent))
        time.sleep(0.5)


def start_on_two_nodes(cluster, shards, out, args, step, **launch):
    """train.sbatch on two nodes of one rank each: (job id, run directory) once the run has logged `step`, its
    ranks seen one on each node."""
    env = job_env(cluster, shards, out, VAL_SHARDS="", TRAIN_ARGS=args, RANKS_PER_NODE="1", **launch)
    job = submit(cluster, "train.sbatch", env, *TWO_NODES)
    run, nodes = out / "run", set()
    wait_for_step(cluster, job, run, step, nodes)
    assert nodes == set(cluster.nodes), nodes
    return job, run


def final_weights(run):
    from tmass.checkpoint import consolidated_state

    _, state, _, meta = consolidated_state(str(run), "latest")
    return state, meta


def test_two_nodes_preempted_requeued_and_resumed_train_what_an_uninterrupted_run_trains(cluster, synthetic_shards,
                                                                                          tmp_path):
    args = TRAIN_ARGS + " --max_steps 12 --num_epochs 20 --transformer_dropout 0.3"
    # A: DeepSpeed's launcher over the job's two nodes (DS_LAUNCHER=slurm: its srun), USR1 to the batch script
    # mid-run. The ranks are srun's tasks, not the script's children: only the stop request reaches them.
    job, run = start_on_two_nodes(cluster, synthetic_shards, tmp_path / "a", args, 3, DS_LAUNCHER="slurm")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # both nodes' ranks save at the next log step, the job requeues itself: back to PENDING with one restart
    info = cluster.wait(job, ("PENDING", "COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    first = run / "logs" / f"train-{job}-restart0.log"
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", first.read_text()[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "signal" and 3 <= summary["step"] < 12 and summary["world"] == 2
    assert (run / "checkpoints" / "latest").read_text() == f"step{summary['step']}"
    assert "requeued" in first.read_text() and not (run / "stop-request").exists()

    # Skip Slurm's requeue delay, but not too soon: slurmd revokes the killed attempt's credential with a 1 s
    # clock, and a relaunch within that second is refused ("Job credential revoked").
    t = time.time()
    while not cluster.idle():
        assert time.time() - t < 120, cluster.logs()
        time.sleep(0.5)
    time.sleep(2)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    second = run / "logs" / f"train-{job}-restart1.log"
    assert info["JobState"] == "COMPLETED", second.read_text()[-3000:] if second.exists() else cluster.logs()
    assert info["Restarts"] == "1"  # the normal end did not requeue again
    assert f"resumed from {run / 'checkpoints'} at step {summary['step']}" in (run / "train.log").read_text()
    assert "finished with status 0" in second.read_text()

    # B: srun, one task per node, uninterrupted
    job, other = start_on_two_nodes(cluster, synthetic_shards, tmp_path / "b", args, 2, LAUNCH_MODE="srun")
    info = cluster.wait(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600)
    log = other / "logs" / f"train-{job}-restart0.log"
    assert info["JobState"] == "COMPLETED", log.read_text()[-3000:] if log.exists() else cluster.logs()
    assert log.read_text().count("srun --ntasks-per-node=1 --ntasks=2") == 1
    assert "--launcher slurm" in first.read_text() and "--hostfile" in first.read_text()

    state, meta = final_weights(run)
    ref, ref_meta = final_weights(other)
    assert meta["step"] == ref_meta["step"] == 12 and meta["world"] == ref_meta["world"] == 2
    for k in ref:
        assert torch.equal(state[k], ref[k]), k


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
