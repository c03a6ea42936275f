"""A real one-node SLURM cluster on this machine, for the tests: munged, slurmctld and slurmd from Debian's
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
    """One node (this machine, all its CPUs), one partition, JobRequeue=1. `env` is what clients need."""

    def __init__(self, root: str):
        self.root = root
        self.node = socket.gethostname().split(".")[0]
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
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            "JobRequeue=1", "ReturnToService=2", "KillWait=30", "MinJobAge=600",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP",
        ]
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
        for daemon in ("slurmctld", "slurmd"):  # -D: in the foreground, so that stop() owns them
            log = open(os.path.join(r, "log", f"{daemon}.out"), "w")
            self.procs.append(subprocess.Popen([_sbin(daemon), "-D", "-f", self.conf], stdout=log,
                                               stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        t = time.time()
        while True:
            p = self.run("sinfo", "-h", "-o", "%T", check=False)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            if time.time() - t > timeout or any(q.poll() is not None for q in self.procs):
                self.stop()
                raise RuntimeError(f"the test cluster did not come up: {p.stdout} {p.stderr}\n{self.logs()}")
            time.sleep(0.5)

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
        for name in ("slurmctld.log", "slurmd.log"):
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
