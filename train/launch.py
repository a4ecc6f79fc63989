"""``condmoe-launch LAUNCHER [ARGS ...]``: runs a launcher (torchrun, the deepspeed launcher) and exits with the
status its ranks meant, for scripts that requeue on 75.

torchrun's elastic agent turns any rank's non-zero exit into its own 1, so a run whose ranks all checkpointed at a
stop signal and exited 75 (``train/signals.py``) looks like a crash. And when torchrun itself gets SIGTERM it forwards
it, then SIGKILLs every rank that has not ended within 30 s: a checkpoint slower than that is torn (its commit marker
keeps it from being used, but the save is lost). This wrapper avoids both without touching torch's agent:

- it gives its ranks a folder (``CONDMOE_LAUNCH_DIR``); each rank writes ``rank<LOCAL_RANK>.json`` (pid, local world
  size) once its stop handlers are installed, and adds ``"status": 75`` once the stop checkpoint is committed;
- SIGTERM and SIGUSR1 sent to the wrapper go to those ranks directly, so the launcher's kill deadline never starts;
  before any rank has written its record they go to the launcher;
- it exits 0 when the launcher does; 75 when every rank of this node recorded the committed stop, whatever the
  launcher returned; otherwise the launcher's own status (128 + N for a launcher ended by signal N).

One wrapper per node (records are per node, like torchrun's own agent). SIGINT is left to the launcher: Ctrl-C in a
terminal reaches the whole foreground process group anyway.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "CONDMOE_LAUNCH_DIR"
STOPPED = 75  # train.signals.EXIT_PREEMPTED (not imported: this module must start without torch)
FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
# How each launcher tells a rank its node's rank count: torchrun, the deepspeed launcher, Open MPI.
_LOCAL_WORLD_SIZE = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _record_path(environ=os.environ) -> Path | None:
    folder = environ.get(ENV)
    return Path(folder) / f"rank{int(environ.get('LOCAL_RANK', 0))}.json" if folder else None


def announce(status: int | None = None) -> None:
    """A rank's record for its ``condmoe-launch`` wrapper: call with no status once the stop handlers are installed,
    and with ``75`` once the stop checkpoint is committed. Does nothing outside the wrapper."""
    path = _record_path()
    if path is None:
        return
    size = next((int(os.environ[key]) for key in _LOCAL_WORLD_SIZE if key in os.environ), None)
    record = {"pid": os.getpid(), "local_world_size": size, "status": status}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # the wrapper never reads half a record


def read_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("rank*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced between glob and read: the next read sees the new one
            continue
    return records


def exit_status(launcher_status: int, records: list[dict]) -> tuple[int, str]:
    """The wrapper's exit status from the launcher's and this node's rank records, and a line saying why (empty when
    the launcher's status stands)."""
    if launcher_status == 0:
        return 0, ""
    sizes = {record.get("local_world_size") for record in records}
    complete = bool(records) and (sizes == {None} or sizes == {len(records)})
    if complete and all(record.get("status") == STOPPED for record in records):
        return STOPPED, (f"all {len(records)} rank(s) of this node committed their stop checkpoint and exited "
                         f"{STOPPED}; the launcher returned {launcher_status}")
    return (128 - launcher_status if launcher_status < 0 else launcher_status), ""


def _forwarder(proc: subprocess.Popen, folder: Path):
    def forward(signum, frame):
        pids = [r["pid"] for r in read_records(folder) if r.get("status") is None and isinstance(r.get("pid"), int)]
        if not pids:
            proc.send_signal(signum)
            return
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # that rank has just ended
                pass

    return forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="condmoe-launch",
        description="Run a launcher and exit 75 when every rank of this node checkpointed at a stop signal and "
                    "exited 75 (torchrun reports 1). SIGTERM and SIGUSR1 sent to this process go to the ranks.",
        epilog="example: condmoe-launch torchrun --nproc_per_node 2 -m condmoe.train --config configs/demo.yaml")
    parser.add_argument("launcher", help="the launcher command (torchrun, deepspeed, ...)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="condmoe-launch-") as tmp:
        folder = Path(tmp)
        try:
            proc = subprocess.Popen([args.launcher, *args.args], env={**os.environ, ENV: tmp})
        except OSError as exc:
            print(f"condmoe-launch: error: cannot start {args.launcher}: {exc.strerror}", file=sys.stderr)
            return 2
        forward = _forwarder(proc, folder)
        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            launcher_status = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        status, why = exit_status(launcher_status, read_records(folder))
    if why:
        print(f"condmoe-launch: {why}: exiting {status}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
