"""Checkpoints that a crash cannot break: a kill while `best` is written, a rank stalled while a step is
written, and files damaged after publishing, each against tmass.checkpoint's publish and fallback rules."""
import os
import signal
import subprocess
import sys
import time

from _procs import clean_env, free_port
from conftest import REPO

TESTS = os.path.join(REPO, "tests")


def start_workers(ckpt_dir, behaviour, world, steps=2):
    port = free_port()
    code = ("import sys, _dist_workers as w; w.checkpoint_worker(int(sys.argv[1]), int(sys.argv[2]), "
            "int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6]))")
    return [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port), str(ckpt_dir), behaviour,
                              str(steps)], cwd=TESTS, env=clean_env(PYTHONPATH=REPO + os.pathsep + TESTS))
            for r in range(world)]


def wait_for(cond, timeout=120):
    t = time.time()
    while not cond():
        assert time.time() - t < timeout, "timed out"
        time.sleep(0.05)


def state_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_kill_while_best_is_written_keeps_the_previous_best(tmp_path):
    from tmass import checkpoint

    ckpt = tmp_path / "checkpoints"
    procs = start_workers(ckpt, "slow", world=1)
    wait_for(lambda: (ckpt / "writing").exists())  # step 2's best is being written
    time.sleep(0.3)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert (ckpt / ".partial-best").is_dir()  # the torn write is there, but never loaded
    assert checkpoint.model_tag(str(ckpt), None) == "best"
    assert checkpoint.read_meta(str(ckpt), "best")["step"] == 1
    assert (ckpt / "best" / "mp_rank_00_model_states.pt").read_bytes() == b"1" * 64
    assert checkpoint.resume_tag(str(ckpt)) == "step1"
    (ckpt / "writing").unlink()
    again = start_workers(ckpt, "plain", world=1)  # a relaunch cleans the torn folder and publishes
    assert again[0].wait(timeout=120) == 0
    assert checkpoint.read_meta(str(ckpt), "best")["step"] == 2 and not (ckpt / ".partial-best").exists()
    assert checkpoint.resume_tag(str(ckpt)) == "step2"


def test_a_stalled_rank_never_lets_latest_point_at_an_incomplete_checkpoint(tmp_path):
    from tmass import checkpoint

    ckpt = tmp_path / "checkpoints"
    procs = start_workers(ckpt, "stall", world=2)
    try:
        wait_for(lambda: state_of(procs[1].pid) == "T")  # rank 1 stopped with an empty optimiser file
        time.sleep(2)  # rank 0 has long finished its own files: it waits at the barrier
        assert procs[0].poll() is None
        assert (ckpt / "latest").read_text() == "step1"
        assert (ckpt / ".partial-best" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").stat().st_size == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert checkpoint.resume_tag(str(ckpt)) == "step1" and checkpoint.read_meta(str(ckpt), "step2") is None
    assert checkpoint.read_meta(str(ckpt), "best")["step"] == 1


def test_damaged_files_fall_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    import pytest

    from tmass import checkpoint

    ckpt = tmp_path / "checkpoints"
    procs = start_workers(ckpt, "plain", world=2, steps=3)
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert checkpoint.resume_tag(str(ckpt)) == "step3"
    with open(ckpt / "step3" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(10)  # torn after publishing (a full disk, a bad copy)
    assert checkpoint.resume_tag(str(ckpt)) == "step2"
    assert "'step3' is missing or incomplete; using step2" in caplog.text
    (ckpt / "best" / checkpoint.META).unlink()
    assert checkpoint.model_tag(str(ckpt), None) == "step2"
    for tag in ("step1", "step2"):
        (ckpt / tag / checkpoint.META).unlink()
    with pytest.raises(checkpoint.NoCheckpoint, match="no complete checkpoint"):
        checkpoint.model_tag(str(ckpt), None)
    with pytest.raises(checkpoint.NoCheckpoint, match="has checkpoints but none is complete"):
        checkpoint.resume_tag(str(ckpt))  # a relaunch must not silently start the run again
