"""slurm/train.sbatch without a cluster: fake scontrol / srun / python on PATH and the SLURM variables of
2 nodes x 4 GPUs; what the script and tmass.dist derive from them; signal -> checkpoint -> requeue."""
import os
import shlex
import signal
import subprocess
import time


from conftest import REPO
from tmass.dist import env_from_slurm, first_host

SCRIPT = os.path.join(REPO, "slurm", "train.sbatch")


def fake_bin(tmp_path, python_body="echo \"$@\" > \"$FAKE_LOG/python.args\"\n",
             srun_body='echo "$@" > "$FAKE_LOG/srun.args"\n'):
    b = tmp_path / "bin"
    b.mkdir()
    (b / "scontrol").write_text('#!/usr/bin/env bash\n'
                                'if [ "$1 $2" = "show hostnames" ]; then printf "gpu012\\ngpu013\\n"; exit 0; fi\n'
                                'echo "$@" >> "$FAKE_LOG/scontrol.calls"\n')
    (b / "srun").write_text("#!/usr/bin/env bash\n" + srun_body)
    (b / "fakepython").write_text("#!/usr/bin/env bash\n" + python_body)
    for f in b.iterdir():
        f.chmod(0o755)
    return b


def env(tmp_path, bindir, **extra):
    e = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path), PYTHON="fakepython",
             SLURM_JOB_NODELIST="gpu[012-013]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_ID="4242",
             SLURM_JOB_NAME="t", SLURM_SUBMIT_DIR=REPO, TRAIN_SHARDS="/shared/train-{000000..000009}.tar",
             OUTPUT_DIR=str(tmp_path / "out"), EXP_NAME="run")
    e.update(extra)
    return e


def test_scripts_parse():
    for name in os.listdir(os.path.join(REPO, "slurm")):
        if name.endswith(".sbatch"):
            subprocess.run(["bash", "-n", os.path.join(REPO, "slurm", name)], check=True)


def test_deepspeed_mode_writes_the_hostfile_and_launches_over_it(tmp_path):
    b = fake_bin(tmp_path)
    p = subprocess.run(["bash", SCRIPT], env=env(tmp_path, b, DS_LAUNCHER="slurm"), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    hostfile = tmp_path / "out" / "run" / "logs" / "hostfile-4242"
    assert hostfile.read_text() == "gpu012 slots=4\ngpu013 slots=4\n"
    args = (tmp_path / "python.args").read_text().split()
    assert args[:3] == ["-m", "deepspeed.launcher.runner", "--hostfile"] and args[3] == str(hostfile)
    assert args[args.index("--launcher") + 1] == "slurm" and args[args.index("--master_addr") + 1] == "gpu012"
    assert "--no_ssh_check" in args  # the slurm launcher reaches the nodes through srun
    assert "launch/train.py" in args and args[args.index("--train_shards") + 1] == "/shared/train-{000000..000009}.tar"
    assert not (tmp_path / "scontrol.calls").exists()  # a normal end does not requeue
    assert (tmp_path / "out" / "run" / "logs" / "train-4242-restart0.log").exists()


def test_one_node_uses_the_local_launcher_without_a_hostfile(tmp_path):
    """With a hostfile, DeepSpeed's runner would ssh to the one node it runs on."""
    b = fake_bin(tmp_path)
    e = env(tmp_path, b, SLURM_JOB_NODELIST="gpu012", SLURM_JOB_NUM_NODES="1")
    for script in ("train.sbatch", "eval.sbatch"):
        e.update(CHECKPOINT=str(tmp_path), TEST_SHARDS="/shared/test-000000.tar")
        p = subprocess.run(["bash", os.path.join(REPO, "slurm", script)], env=e, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stderr
        args = (tmp_path / "python.args").read_text().split()
        assert args[:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4"] and "--hostfile" not in args
    assert not list((tmp_path / "out" / "run" / "logs").glob("hostfile-*"))


def test_cpu_nodes_need_ranks_per_node(tmp_path):
    b = fake_bin(tmp_path)
    p = subprocess.run(["bash", SCRIPT], env=env(tmp_path, b, SLURM_GPUS_ON_NODE="0"), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and "set RANKS_PER_NODE" in p.stderr
    p = subprocess.run(["bash", SCRIPT], env=env(tmp_path, b, SLURM_GPUS_ON_NODE="0", RANKS_PER_NODE="3"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "run" / "logs" / "hostfile-4242").read_text() == "gpu012 slots=3\ngpu013 slots=3\n"


def test_srun_mode_one_task_per_gpu(tmp_path):
    b = fake_bin(tmp_path, srun_body='echo "$@" > "$FAKE_LOG/srun.args"; echo "$MASTER_ADDR $MASTER_PORT" > '
                                     '"$FAKE_LOG/srun.env"\n')
    p = subprocess.run(["bash", SCRIPT], env=env(tmp_path, b, LAUNCH_MODE="srun", SLURM_RESTART_COUNT="2"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    args = (tmp_path / "srun.args").read_text().split()
    assert "--ntasks-per-node=4" in args and "--ntasks=8" in args
    assert (tmp_path / "srun.env").read_text().split() == ["gpu012", str(29500 + 4242)]  # where the tasks meet
    assert (tmp_path / "out" / "run" / "logs" / "train-4242-restart2.log").exists()
    p = subprocess.run(["bash", SCRIPT], env=env(tmp_path, b, LAUNCH_MODE="srun", TMASS_MASTER_ADDR="10.1.2.3"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and (tmp_path / "srun.env").read_text().split()[0] == "10.1.2.3", p.stderr


def test_rank_mapping_under_srun_for_2_nodes_x_4_gpus():
    seen = []
    for procid in range(8):
        e = {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % 4), "SLURM_NTASKS": "8",
             "SLURM_JOB_NODELIST": "gpu[012-013]", "SLURM_JOB_ID": "4242"}
        env_from_slurm(e)
        seen.append((e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"], e["MASTER_ADDR"], e["MASTER_PORT"]))
    assert [s[0] for s in seen] == [str(i) for i in range(8)] and [s[1] for s in seen] == ["0", "1", "2", "3"] * 2
    assert {s[2:] for s in seen} == {("8", "gpu012", str(29500 + 4242))}
    assert env_from_slurm({"RANK": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == {}  # a launcher's own wins
    assert first_host("node7,gpu[1-4]") == "node7" and first_host("a[09,11-12]") == "a09"


# A fake rank: polls its run's stop request (as rank 0 does at log steps), then "saves" and exits 0.
RANK = ('echo started > "$FAKE_LOG/started"; '
        'for i in $(seq 600); do [ -e "$FAKE_LOG/out/run/stop-request" ] && break; sleep 0.1; done; '
        'echo saved > "$FAKE_LOG/saved"')


def wait_for(path, proc, seconds=30):
    t = time.time()
    while not path.exists():
        assert time.time() - t < seconds and proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)


def test_signal_checkpoints_then_requeues_once(tmp_path):
    # srun OPTS... fakepython ARGS: run the one task in place
    b = fake_bin(tmp_path, RANK, srun_body='shift 3\nexec "$@"\n')
    p = subprocess.Popen(["bash", SCRIPT], env=env(tmp_path, b, LAUNCH_MODE="srun"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "started", p)
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert (tmp_path / "saved").read_text().strip() == "saved"
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert "job 4242 attempt 0" in (tmp_path / "out" / "run" / "stop-request").read_text()


def test_the_stop_request_reaches_ranks_out_of_the_scripts_reach(tmp_path):
    """Launcher mode over pdsh: the ranks are children of sshd on each node, not of this script, and no signal
    of the script reaches them. Here the rank is detached (setsid, its parent gone); it stops on the run's stop
    request. A request left by an earlier attempt is removed before the launch, so it stops nobody."""
    runner = ('echo "$@" > "$FAKE_LOG/python.args"\n'
              f'(setsid bash -c {shlex.quote(RANK)} &)\n'  # detached, as under pdsh + ssh
              'for i in $(seq 600); do [ -e "$FAKE_LOG/saved" ] && exit 0; sleep 0.1; done; exit 1\n')
    b = fake_bin(tmp_path, runner)
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "stop-request").write_text("job 4241 attempt 0")  # stale
    p = subprocess.Popen(["bash", SCRIPT], env=env(tmp_path, b), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    wait_for(tmp_path / "started", p)
    time.sleep(1)
    assert not (tmp_path / "saved").exists()  # the stale request stopped nobody
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert (tmp_path / "saved").read_text().strip() == "saved"
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]


def test_eval_script_launches_over_the_same_hostfile(tmp_path):
    b = fake_bin(tmp_path)
    e = env(tmp_path, b, CHECKPOINT=str(tmp_path), TEST_SHARDS="/shared/test-000000.tar", EVAL_ARGS="--DSL")
    p = subprocess.run(["bash", os.path.join(REPO, "slurm", "eval.sbatch")], env=e, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    args = (tmp_path / "python.args").read_text().split()
    hostfile = args[args.index("--hostfile") + 1]
    assert open(hostfile).read() == "gpu012 slots=4\ngpu013 slots=4\n"
    assert args[args.index("--checkpoint") + 1] == str(tmp_path) and "--DSL" in args
    assert args[args.index("--results") + 1] == f"{tmp_path}/test_results.json"
