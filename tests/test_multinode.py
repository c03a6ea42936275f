"""Two nodes for real, on one machine: two launchers that rendezvous over TCP, as on two hosts. `torchrun
--nnodes 2 --node_rank K` and DeepSpeed's own launcher without ssh (`--no_ssh --num_nodes 2 --node_rank K` over a
hostfile) each train the same weights, bit for bit, as one node with two ranks, and each node reads its own
share of the samples at every step."""
import json
import os
import subprocess
import sys

import torch

from _procs import clean_env, free_port
from conftest import REPO

BIN = os.path.dirname(sys.executable)


def args(shards, out, exp):
    return [os.path.join(REPO, "launch", "train.py"), "--deepspeed_config", os.path.join(REPO, "ds_configs",
            "cpu_fp32.json"), "--preset", "demo", "--num_frames", "4", "--transformer_dropout", "0.3",
            "--train_shards", str(shards / "train-{000000..000003}.tar"), "--batch_size", "4", "--max_steps", "5",
            "--output_dir", str(out), "--exp_name", exp, "--num_workers", "1", "--log_step", "1", "--log_samples",
            "--shard_sampling", "shuffled"]


def run_all(cmds):
    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]


def final(run):
    from tmass.checkpoint import consolidated_state

    _, state, _, meta = consolidated_state(str(run), "latest")
    samples = {}
    for r in (0, 1):
        for line in (run / f"samples-rank{r}.jsonl").read_text().splitlines():
            e = json.loads(line)
            samples[(e["step"], r)] = e["keys"]
    return state, samples, meta


def test_two_nodes_train_what_one_node_trains(synthetic_shards, tmp_path):
    one = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           *args(synthetic_shards, tmp_path, "one")]
    port = free_port()
    torchrun = [[os.path.join(BIN, "torchrun"), "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(port), *args(synthetic_shards, tmp_path, "tr")]
                for k in (0, 1)]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port2 = free_port()
    ds = [[os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
           "--node_rank", str(k), "--master_addr", "127.0.0.1", "--master_port", str(port2),
           *args(synthetic_shards, tmp_path, "ds")] for k in (0, 1)]
    run_all([one])
    run_all(torchrun)
    run_all(ds)
    ref_state, ref_samples, ref_meta = final(tmp_path / "one")
    assert ref_meta["step"] == 5 and ref_meta["world"] == 2
    for exp in ("tr", "ds"):
        state, samples, meta = final(tmp_path / exp)
        assert meta["world"] == 2 and meta["step"] == 5
        assert samples == ref_samples, exp  # node K's rank reads what rank K of one node reads
        for step in range(5):
            assert not set(samples[(step, 0)]) & set(samples[(step, 1)])  # each node its own share
        for k in ref_state:
            assert torch.equal(state[k], ref_state[k]), (exp, k)


def test_a_lone_process_takes_another_port_when_its_free_port_is_taken():
    """A plain `python launch/...` picks a free port for its one-rank group; when another process takes it first
    (the race of every free-port pick), dist.init takes another instead of failing."""
    code = """
import socket
import tmass.dist as d
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()
ports = [busy.getsockname()[1]]
real = d._free_port
d._free_port = lambda: ports.pop(0) if ports else real()
info = d.init()
import os
print(info.world, os.environ["MASTER_PORT"] != str(busy.getsockname()[1]))
"""
    env = clean_env(DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.split()[-2:] == ["1", "True"], p.stdout + p.stderr[-3000:]
