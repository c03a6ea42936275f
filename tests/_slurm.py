"""A real two-node SLURM cluster on this machine, for the tests: munged, slurmctld and a slurmd per node from Debian's
packages (`.ci/run` installs them), configured in a temporary folder and stopped afterwards."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from _procs import clean_env, free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sacct")


def missing() -> list[str]:
    """The programs this machine lacks to run the cluster (empty: it can)."""
    found = [shutil.which(p) or (os.path.exists(f"/usr/sbin/{p}") and p) for p in DAEMONS + CLIENTS]
    return [p for p, f in zip(DAEMONS + CLIENTS, found) if not f]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """`nodes` nodes on this machine (each with all its CPUs; a slurmd each, `slurmd -N NAME`, on a port of its
    own), one partition, JobRequeue=1. `env` is what clients need. The node names (tmass1, tmass2, ...) do not
    resolve: jobs meet at 127.0.0.1 (TMASS_MASTER_ADDR)."""

    def __init__(self, root: str, nodes: int = 2):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [f"tmass{i + 1}" for i in range(nodes)]
        self.conf = os.path.join(root, "slurm.conf")
        self.munge_socket = os.path.join(root, "munge", "munge.socket")
        self.env = clean_env(SLURM_CONF=self.conf)
        self.procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        for d in ("state", "spool", "munge", "log"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        cpus = os.cpu_count() or 2
        r = self.root
        lines = [
            "ClusterName=tmasstest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "JobRequeue=1", "ReturnToService=2", "KillWait=30", "MinJobAge=600",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            *(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={cpus} "
              "State=UNKNOWN" for n in self.nodes),
            f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE OverSubscribe=NO "
            "State=UP",
        ]
        for n in self.nodes:
            os.makedirs(os.path.join(r, "spool", n), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 60) -> "Cluster":
        self._write_conf()
        r = self.root
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(os.path.join(r, "munge"), 0o700)
        subprocess.run([_sbin("munged"), "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                        f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/munge/munged.seed"], check=True, timeout=30)
        daemons = [("slurmctld", [])] + [("slurmd", ["-N", n]) for n in self.nodes]
        for daemon, opts in daemons:  # -D: in the foreground, so that stop() owns them
            log = open(os.path.join(r, "log", f"{daemon}{''.join(opts[1:])}.out"), "w")
            self.procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", self.conf, *opts], stdout=log,
                                               stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        t = time.time()
        while True:
            if self.idle():
                return self
            if time.time() - t > timeout or any(q.poll() is not None for q in self.procs):
                states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
                self.stop()
                raise RuntimeError(f"the test cluster did not come up: {states.stdout} {states.stderr}\n"
                                   f"{self.logs()}")
            time.sleep(0.5)

    def idle(self) -> bool:
        """Every node up and idle."""
        p = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return p.returncode == 0 and p.stdout.split() == ["idle"] * len(self.nodes)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {p.stdout}{p.stderr}")
        return p

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job: JobState, RunTime, Restarts, BatchFlag, ..."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout.split()
        return dict(f.split("=", 1) for f in out if "=" in f)

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        t = time.time()
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.time() - t > timeout:
                raise TimeoutError(f"job {job_id} is {info['JobState']} after {timeout} s, not {states}\n"
                                   f"{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        out = []
        for name in ["slurmctld.log"] + [f"slurmd.{n}.log" for n in self.nodes]:
            path = os.path.join(self.root, "log", name)
            if os.path.exists(path):
                with open(path) as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-30:]))
        return "\n".join(out)

    def stop(self) -> None:
        self.run("scancel", "--full", "--state=RUNNING", "--state=PENDING", check=False)
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        pid = os.path.join(self.root, "munge", "munged.pid")
        if os.path.exists(pid):
            with open(pid) as f:
                try:
                    os.kill(int(f.read().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
