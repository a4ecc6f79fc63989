"""Tier 3: the sbatch scripts in slurm/ on a real SLURM (Debian's slurm-wlm): a 2-node cluster on this machine.

The session fixture starts munged, slurmctld and two slurmd (n1, n2: both this host, on loopback) with state, spool,
logs and pids in a temp dir, and stops them by pid at the end. Jobs get 2 nodes x 1 task, DS_ACCELERATOR=cpu and a
tiny config with ep_size 2 over the 2 ranks. Skipped, with the reason, when not root or when the packages are
missing and cannot be installed.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env
from test_distributed import losses, small_config

pytestmark = pytest.mark.slow

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")
HOSTS_LINE = "127.0.0.1 n1 n2  # condmoe tests/test_slurm.py"
# How long a requeued job waits before it may start again is the credential lifetime + 1 s (120 s by default); the
# main scheduler loop runs every 60 s by default. Both are shortened so that a requeue takes seconds here.
CRED_EXPIRE_S = 5
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _install_packages() -> str | None:
    """Installs slurm-wlm and munge with apt if a daemon is missing; returns why not, or None when they are there."""
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    for attempt in ([install], [["apt-get", "update", "-q"], install]):  # update only if the lists are stale
        if all(subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode == 0 for cmd in attempt):
            break
    missing = [d for d in DAEMONS if not shutil.which(d)]
    return f"apt-get install {' '.join(PACKAGES)} failed ({', '.join(missing)} missing)" if missing else None


def _free_port_run(count: int, start: int = 17000, stop: int = 18000) -> int:
    """The first of ``count`` consecutive free TCP ports on 127.0.0.1 (slurmd ports are given as a range)."""
    for first in range(start, stop - count):
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports in [{start}, {stop})")


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Cluster:
    """A running 2-node SLURM: submit with ``sbatch``, then ``wait`` for a job's final state."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(subprocess_env(), SLURM_CONF=str(self.conf))
        self.procs: dict[str, subprocess.Popen] = {}

    def run(self, *cmd: str, cwd: Path | None = None, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 30) -> str:
        proc = subprocess.run(cmd, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> int:
        return int(self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (finished jobs stay visible for MinJobAge)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int | str, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Waits until the job has ended for good (not requeued); fails with its log if it took too long."""
        try:
            return _wait_for(lambda: (info := self.job(job_id)) and info.get("JobState") in FINAL_STATES and info,
                             timeout, f"job {job_id}", interval=0.5)
        except TimeoutError:
            text = log.read_text() if log and log.is_file() else ""
            pytest.fail(f"job {job_id} did not end in {timeout}s: {self.job(job_id)}\n{text[-6000:]}")

    def start(self) -> None:
        root = self.root
        (root / "munge").mkdir()
        shutil.chown(root / "munge", "munge", "munge")
        for sub in ("state", *(f"spool/{node}" for node in NODES)):
            (root / sub).mkdir(parents=True)
        ctld_port = _free_port_run(3)
        host = socket.gethostname()
        self.conf.write_text(f"""\
ClusterName=condmoe-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MinJobAge=600
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{ctld_port + 1}-{ctld_port + 2}] CPUs=2 Gres=gpu:1
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
""")
        # One fake GPU per node (/dev/null as its device), so that --gpus-per-node works as on a GPU cluster.
        (root / "gres.conf").write_text("NodeName=n[1-2] Name=gpu File=/dev/null\n")
        logs = {name: open(root / f"{name}.out", "w") for name in ("munged", "slurmctld", *NODES)}
        # munged refuses to run as root and checks that its socket directory is reachable by everyone.
        self.procs["munged"] = subprocess.Popen(
            ["munged", "--foreground", f"--socket={root}/munge/munge.socket", f"--pid-file={root}/munge/munged.pid",
             f"--log-file={root}/munge/munged.log"], user="munge", group="munge", stdout=logs["munged"],
            stderr=subprocess.STDOUT)
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), 20, "munged's socket")
        self.procs["slurmctld"] = subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                                   stdout=logs["slurmctld"], stderr=subprocess.STDOUT)
        for node in NODES:
            self.procs[node] = subprocess.Popen(["slurmd", "-D", "-N", node, "-f", str(self.conf)], env=self.env,
                                                stdout=logs[node], stderr=subprocess.STDOUT)
        for log in logs.values():
            log.close()  # the daemons hold their own descriptors

        def idle() -> bool:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            out = self.run("sinfo", "--noheader", "--format=%N %t", "--Node", check=False)
            return sorted(out.split()) == sorted(["idle", "idle", *NODES])

        try:
            _wait_for(idle, 30, "both nodes idle")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}: {self.run('sinfo', '--Node', '--long', check=False)}\n{self.logs()}") from None

    def logs(self) -> str:
        files = sorted([*self.root.glob("*.out"), *self.root.glob("*.log"), *self.root.glob("munge/*.log")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in files)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Jobs outlive slurmd (slurmstepd is detached from it): cancel them and let SLURM clean up first.
            self.run("scancel", "--full", "--user=root", check=False)
            try:
                _wait_for(lambda: not self.run("squeue", "--noheader", check=False).strip(), 60, "empty queue")
            except TimeoutError:
                pass
        for name in (*NODES, "slurmctld", "munged"):  # by pid, most dependent first
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _resolve(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


def _ensure_node_names() -> bool:
    """n1 and n2 must resolve to 127.0.0.1 (MASTER_ADDR is a node name); returns whether /etc/hosts was changed."""
    addresses = {node: _resolve(node) for node in NODES}
    if all(address == "127.0.0.1" for address in addresses.values()):
        return False
    for node, address in addresses.items():
        if address not in (None, "127.0.0.1"):
            pytest.skip(f"{node} resolves to {address} here, not to this machine: the test cluster needs the name")
    text = Path("/etc/hosts").read_text()
    Path("/etc/hosts").write_text(text + ("" if text.endswith("\n") or not text else "\n") + HOSTS_LINE + "\n")
    return True


def _restore_node_names() -> None:
    lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
    Path("/etc/hosts").write_text("".join(line for line in lines if line.strip() != HOSTS_LINE))


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("a SLURM test cluster needs root (munged, slurmd, /etc/hosts)")
    reason = _install_packages()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="condmoe-slurm-"))
    root.chmod(0o755)  # munged (user munge) must reach its socket directory inside
    changed_hosts = _ensure_node_names()
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if changed_hosts:
            _restore_node_names()
        shutil.rmtree(root, ignore_errors=True)


# 2 nodes x 1 task (one fake GPU each); the header's 8 tasks/GPUs and 10 CPUs per node are overridden.
ALLOCATION = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10")
PRETRAIN = str(REPO / "slurm" / "pretrain.sbatch")
PREP = str(REPO / "slurm" / "prep.sbatch")


def _layout(text: str) -> dict[int, dict[str, str]]:
    """The ``condmoe-layout`` lines of a dry run, by rank."""
    lines = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in text.splitlines() if line.startswith("condmoe-layout")]
    return {int(line["rank"]): line for line in lines}


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_dry_run_prints_each_ranks_layout(slurm_cluster, tiny_data, tmp_path, launcher):
    cfg = small_config(tmp_path, tiny_data)
    job = slurm_cluster.sbatch(*ALLOCATION, f"--output={tmp_path}/job.out", PRETRAIN, str(cfg), cwd=tmp_path,
                               env={"CONDMOE_DRY_RUN": "1", "CONDMOE_LAUNCHER": launcher})
    info = slurm_cluster.wait(job, 120, tmp_path / "job.out")
    text = (tmp_path / "job.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    port = 15000 + job % 15000
    layout = _layout(text)
    assert sorted(layout) == [0, 1], text
    for rank, node in ((0, "n1"), (1, "n2")):  # rank r on node r+1, every process agrees on the rendezvous
        assert layout[rank] | {"host": "-"} == {"rank": str(rank), "world_size": "2", "local_rank": "0",
                                                "source": "env", "master": f"n1:{port}", "host": "-",
                                                "slurm_node": node}, text
    assert "would run the step above with python -m condmoe.train" in text
    assert not (tmp_path / "run").exists()  # nothing trained
    if launcher == "deepspeed":
        assert "n1 slots=1" in text and "n2 slots=1" in text  # the hostfile it printed


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_pretrain_preempted_checkpoints_requeues_and_resumes(slurm_cluster, tiny_data, tmp_path, launcher):
    """Both forms train 2 ranks on 2 nodes; USR1 to the batch shell (what --signal=B:USR1@T sends) makes every rank
    checkpoint and exit 75, the job requeues itself, and the requeued run resumes from that checkpoint and finishes."""
    max_steps = 60
    cfg = small_config(tmp_path, tiny_data, **{"run.max_steps": max_steps, "run.save_every": 1000})
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = slurm_cluster.sbatch(*ALLOCATION, f"--output={log}", PRETRAIN, str(cfg), cwd=tmp_path,
                               env={"CONDMOE_LAUNCHER": launcher})
    metrics = out / "train_rank1.jsonl"

    def training() -> bool:  # two steps logged: the ranks are past start-up and have their signal handlers
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            return True
        if slurm_cluster.job(job).get("JobState") in FINAL_STATES:
            pytest.fail(f"job ended before it was signalled:\n{log.read_text()[-6000:]}")
        return False

    _wait_for(training, 180, "training to start")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = slurm_cluster.wait(job, 240, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"

    first, second = text.split("(restart 1)")
    assert "(restart 0)" in first and "USR1 (preemption warning)" in first
    assert "exit code 75" in first, first[-4000:]  # srun reports the ranks' EXIT_PREEMPTED
    stopped = int(re.search(rf"training steps (\d+)\.\.{max_steps}", second).group(1))
    assert 0 < stopped < max_steps, second[-4000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{max_steps}"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step_")) == [f"step_{stopped}",
                                                                                    f"step_{max_steps}"]
    for rank in (0, 1):
        assert sorted(losses(out, rank)) == list(range(max_steps))  # no step lost or repeated across the requeue


def test_prep_array_merges_parts(slurm_cluster, tmp_path):
    """3 array tasks each write a part of an imagefolder dataset; the merge job they submitted indexes all of it."""
    from PIL import Image

    images = tmp_path / "images"
    for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (images / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24 + i, 24), colour).save(images / label / f"{i}.jpg")
    out = tmp_path / "prepared"
    array = slurm_cluster.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/prep-%a.out", PREP,
                                 "imagefolder", "--input", str(images), "--out", "prepared", "--dataset", "toy",
                                 "--shard-size", "2", "--image-size", "16", cwd=tmp_path)
    for task in range(3):
        info = slurm_cluster.wait(f"{array}_{task}", 120, tmp_path / f"prep-{task}.out")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"prep-{task}.out").read_text()
    merge_log = _wait_for(lambda: next(tmp_path.glob("slurm-condmoe-prep-merge-*.out"), None), 30, "the merge job")
    merge_job = int(re.search(r"-(\d+)\.out$", merge_log.name).group(1))
    info = slurm_cluster.wait(merge_job, 120, merge_log)
    assert info["JobState"] == "COMPLETED" and info["Dependency"] == "(null)", merge_log.read_text()

    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["datasets"]["toy/train"]
    assert entry["num_samples"] == 12
    assert sum(s["num_samples"] for s in entry["shards"]) == 12
    assert len(entry["shards"]) >= 3  # each part wrote its own shards
    assert all((out / "toy" / "train" / s["name"]).is_file() for s in entry["shards"])
    assert json.loads((out / "sizes.json").read_text())["toy/train"] == 12
    verify = slurm_cluster.run(str(Path(sys.executable).parent / "condmoe-prep"), "verify", str(out))
    assert verify.startswith("OK: ") and "12 samples" in verify, verify
