"""The GPU suite: one command that readies a bare GPU machine (torch installed, nothing of condmoe's) and runs
condmoe's GPU checks in order, each step under its own time limit, 7 minutes in all.

    bash bench/prepare_gpu_wheels.sh            # here, once: bench/wheels/, what the GPU machine lacks (git-ignored)
    bash bench/gpu_suite.sh OUT_DIR             # on the GPU machine
    bash bench/gpu_suite.sh OUT_DIR --dry-run   # on CPU: the same steps at tiny sizes; installs nothing

The GPU machine needs this checkout and bench/wheels/ (about 40 MB). Where only a few files come back from it, pack
the results without the scratch folder: ``tar czf suite.tgz -C OUT_DIR --exclude ./work .``.

Steps (``STEPS``; a failed step does not stop the next):

  1. ``install``: condmoe's runtime requirements that are missing (never torch) from bench/wheels/ (``pip install
     --no-index``), then condmoe itself (``pip install --no-deps -e .``); the dry run only checks the imports;
  2. ``moe_layer``: ``bench/moe_layer.py`` at ViT-B width (768/3072), 8 experts, top-1 and top-2, 12,608 tokens, bf16,
     forward + backward, grouped GEMMs (dense floor, DeepSpeed stock MoE, AutoEP grouped experts, condmoe's layers);
  3. ``train_step``: ``bench/train_step.py`` at ViT-B/16, batch 128 at 224 px, bf16 autocast (its GPU defaults):
     condmoe MoE-B (token, top-2, every other block), its dense twin, attribute-routed MoE-B, timm ViT-B, timm ViT-B +
     DeepSpeed stock MoE;
  4. ``train_step_compile``: the same under ``torch.compile``, most wanted first (the JSON keeps finished models);
  5. ``trainer``: synthetic shards (``condmoe-prep synthetic``), then the trainer on one GPU (``configs/demo.yaml``:
     debug size, 4 experts; ``ds_configs/zero2_bf16.json``) for 30 steps with a checkpoint, then resumed from it to
     35 steps;
  6. ``gpu_tests``: ``pytest -m gpu`` (no test marked gpu counts as a pass; the JSON says how many ran);
  7. ``peak_memory``: ``bench/peak_memory.py``: peak memory per step of MoE-B under ZeRO-1 and ZeRO-2, and the
     largest batch that fits (doubling, then bisection).

OUT_DIR receives ``<step>.log`` (the step's exact commands, each on a line ``$ ...``, and their output, its printed
table included), ``<step>.json`` (its figures) and ``summary.json`` (per step: rc, seconds, timed_out, problems),
rewritten after every step; data and runs go to OUT_DIR/work. A step's rc is its first failing command's (124 when
its time ran out), else 1 when its JSON lacks what the step should measure. The exit code is 0 when every step
passed.
"""

import argparse
import configparser
import contextlib
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "bench" / "wheels"
TOTAL_SECONDS = 420  # the GPU run's budget: every step's limit is cut to what is left of it
TRAIN_STEP_MODELS = ["moe", "dense", "moe-attribute", "timm", "timm-ds-moe"]
COMPILE_MODELS = ["moe", "timm", "dense", "moe-attribute", "timm-ds-moe"]  # in the order they are wanted
IMPORTS = ["condmoe.models._compat", "deepspeed", "webdataset", "av", "simplejpeg", "timm", "transformers",
           "condmoe.train.trainer"]  # condmoe's _compat before timm (models/_compat.py says why)
VERSIONS = ["torch", "deepspeed", "webdataset", "av", "simplejpeg", "timm", "transformers", "condmoe"]


def runtime_requirements(setup_cfg: str) -> list[str]:
    """condmoe's ``install_requires`` from setup.cfg's text, torch left out (the machine's own build is kept)."""
    parser = configparser.ConfigParser()
    parser.read_string(setup_cfg)
    lines = [line.strip() for line in parser["options"]["install_requires"].splitlines()]
    return [line for line in lines if line and canonicalize_name(Requirement(line).name) != "torch"]


def unmet(requirements: list[str], installed: dict[str, str | None]) -> list[str]:
    """The requirements that ``installed`` (canonical name -> version, None: absent) does not satisfy."""
    missing = []
    for line in requirements:
        req = Requirement(line)
        version = installed.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def installed_versions(requirements: list[str]) -> dict[str, str | None]:
    versions = {}
    for line in requirements:
        name = canonicalize_name(Requirement(line).name)
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Suite:
    """The run's settings and the current step's log, time limit and command exit codes."""

    out: Path
    dry_run: bool
    deadline: float = 0.0  # time.monotonic() by which the current step must end
    step: str = ""
    rcs: list[int] = field(default_factory=list)
    timed_out: bool = False

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def log(self) -> Path:
        return self.out / f"{self.step}.log"

    @property
    def json_path(self) -> Path:
        return self.out / f"{self.step}.json"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["DS_ACCELERATOR"] = "cpu" if self.dry_run else env.get("DS_ACCELERATOR", "cuda")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        return env

    def run(self, cmd: list[str]) -> int:
        """Runs ``cmd`` in the repository, output appended to the step's log, within the step's time: on time out its
        process group is ended (torchrun's workers too) and the rc is 124."""
        timeout = self.deadline - time.monotonic()
        with self.log.open("a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            if timeout <= 0:
                rc = 124
            else:
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    rc = 124
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                    with contextlib.suppress(ProcessLookupError):  # what ignored SIGTERM, or outlived its parent
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if rc == 124:
                self.timed_out = True
                log.write(f"# time limit of the step reached: {cmd[0]} ended\n")
            log.write(f"# rc {rc}\n")
        self.rcs.append(rc)
        return rc


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ---------------------------------------------------------------------------------------------------------- steps
# Each step runs its commands through ``s.run`` and returns its problems: what its JSON should hold and does not.


def step_install(s: Suite) -> list[str]:
    requirements = runtime_requirements((REPO / "setup.cfg").read_text())
    missing = unmet(requirements, installed_versions(requirements))
    problems, torch_before = [], importlib.metadata.version("torch")
    if missing and not s.dry_run:
        if any(WHEELS.glob("*.whl")):
            s.run(python("-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", "--find-links", str(WHEELS),
                         *missing))
        else:
            problems.append(f"no wheels in {WHEELS}: run bench/prepare_gpu_wheels.sh where pip works")
    probe = subprocess.run(python("-c", "import condmoe; print(condmoe.__file__)"), cwd="/", capture_output=True,
                           text=True, env=s.env())
    if not s.dry_run and not probe.stdout.strip().startswith(str(REPO)):
        s.run(python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(REPO)))
    versions_json = s.work / "versions.json"
    versions_json.unlink(missing_ok=True)
    s.run(python("-c", "import importlib, importlib.metadata as m, json, sys\n"
                       f"for name in {IMPORTS!r}: importlib.import_module(name)\n"
                       f"json.dump({{n: m.version(n) for n in {VERSIONS!r}}}, open(sys.argv[1], 'w'))",
                 str(versions_json)))
    versions = read_json(versions_json)
    still = unmet(requirements, installed_versions(requirements))
    s.json_path.write_text(json.dumps({"missing_before": missing, "missing_after": still, "versions": versions,
                                         "torch_before": torch_before}, indent=2) + "\n")
    if still:
        problems.append(f"still missing: {', '.join(still)}")
    if not versions:
        problems.append(f"the imports failed: {', '.join(IMPORTS)}")
    elif versions["torch"] != torch_before:
        problems.append(f"torch changed from {torch_before} to {versions['torch']}")
    return problems


def step_moe_layer(s: Suite) -> list[str]:
    sizes = (["--device", "cpu", "--dtype", "float32", "--tokens", "128", "--dim", "32", "--hidden", "64",
              "--iters", "1", "--warmup", "1"] if s.dry_run else
             ["--device", "cuda", "--dtype", "bfloat16", "--tokens", "12608", "--dim", "768", "--hidden", "3072",
              "--grouped"])
    s.run(python("bench/moe_layer.py", *sizes, "--experts", "8", "--json", str(s.json_path)))
    results = read_json(s.json_path).get("results", [])
    problems = [f"{r['layer']} (k={r['top_k']}): no time" for r in results if not r["ms"] > 0]
    if {r["top_k"] for r in results} != {1, 2}:
        problems.append("moe_layer.json: not both top-1 and top-2")
    return problems


def train_step_command(s: Suite, models: list[str], *extra: str) -> list[str]:
    sizes = (["--device", "cpu", "--size", "debug", "--img-size", "32", "--batch-size", "2", "--classes", "10",
              "--warmup", "1", "--iters", "1", "--rounds", "1"] if s.dry_run else ["--device", "cuda"])
    return python("bench/train_step.py", *sizes, "--models", *models, *extra, "--json", str(s.json_path),
                  "--json-each-model")


def train_step_problems(s: Suite, models: list[str]) -> list[str]:
    rows = {r["model"]: r for r in read_json(s.json_path).get("results", [])}
    problems = [f"{name}: not measured" for name in models if name not in rows]
    problems += [f"{name}: {row['error']}" for name, row in rows.items() if "error" in row]
    return problems + [f"{name}: no time" for name, row in rows.items() if "error" not in row and not row["ms"] > 0]


def step_train_step(s: Suite) -> list[str]:
    s.run(train_step_command(s, TRAIN_STEP_MODELS))
    return train_step_problems(s, TRAIN_STEP_MODELS)


def step_train_step_compile(s: Suite) -> list[str]:
    # CPU: dynamo's tracing without code generation, and two models, or the dry run would take minutes
    models, backend = (["timm", "dense"], ["--compile-backend", "eager"]) if s.dry_run else (COMPILE_MODELS, [])
    s.run(train_step_command(s, models, "--compile", *backend))
    return train_step_problems(s, models)


def latest_checkpoint(run_dir: Path) -> str:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


def step_trainer(s: Suite) -> list[str]:
    data, run_dir = s.work / "data", s.work / "trainer_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run left by an earlier suite would be resumed
    images, val, shard = ("64", "16", "32") if s.dry_run else ("512", "64", "128")
    s.run(python("-m", "condmoe.data_prep.cli", "synthetic", "--out", str(data), "--num-train-images", images,
                 "--num-val-images", val, "--num-train-videos", "2", "--num-val-videos", "2", "--num-train-dense", "0",
                 "--num-val-dense", "0", "--shard-size", shard, "--no-progress"))
    steps, resumed = (2, 3) if s.dry_run else (30, 35)
    overrides = [f"data.root={data}", f"run.output_dir={run_dir}", f"run.save_every={steps}", "run.progress_bar=never",
                 f"run.log_every={1 if s.dry_run else 10}", "moe.ep_size=1", "data.shuffle_buffer=64",
                 f"deepspeed_config=ds_configs/{'zero2_cpu' if s.dry_run else 'zero2_bf16'}.json"]
    if s.dry_run:
        overrides += ["tasks.0.batch_size=4", "tasks.1.batch_size=4"]
    report, problems = {}, []
    for phase, first, max_steps in (("train", 0, steps), ("resume", steps, resumed)):
        start = time.monotonic()
        rc = s.run(python("-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", "-m", "condmoe.train", "--config", "configs/demo.yaml",
                          *overrides, f"run.max_steps={max_steps}"))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
            if (run_dir / "metrics.jsonl").is_file() else []
        keys = ("step", "loss", "samples_per_s", "seconds_per_step", "mfu")
        report[phase] = {"rc": rc, "seconds": round(time.monotonic() - start, 1),
                         "latest_checkpoint": latest_checkpoint(run_dir),
                         "metrics": [{k: r[k] for k in keys if k in r} for r in records if r["step"] > first]}
        if report[phase]["latest_checkpoint"] != f"step_{max_steps}":
            problems.append(f"{phase}: latest checkpoint {report[phase]['latest_checkpoint'] or 'none'}, "
                            f"not step_{max_steps}")
        if not report[phase]["metrics"]:
            problems.append(f"{phase}: no metrics after step {first}")
    if f"training steps {steps}..{resumed}" not in s.log.read_text():
        problems.append(f"resume: did not start from step {steps}")
    s.json_path.write_text(json.dumps(report, indent=2) + "\n")
    return problems


def step_gpu_tests(s: Suite) -> list[str]:
    xml = s.work / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    rc = s.run(python("-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "tests"))
    counts = {"rc": rc}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    if rc == 5:  # pytest's "no tests collected": nothing is marked gpu yet
        s.rcs[-1] = 0
        counts["note"] = "no test is marked gpu"
    s.json_path.write_text(json.dumps(counts, indent=2) + "\n")
    return [] if "tests" in counts else ["no junit report"]


def step_peak_memory(s: Suite) -> list[str]:
    sizes = (["--device", "cpu", "--size", "debug", "--img-size", "32", "--classes", "10", "--start-batch", "1",
              "--max-batch", "4", "--steps", "1", "--seconds", "20"] if s.dry_run else
             ["--device", "cuda", "--seconds", "28"])
    s.run(python("bench/peak_memory.py", *sizes, "--json", str(s.json_path)))
    stages = read_json(s.json_path).get("stages", [])
    problems = [] if [st["zero_stage"] for st in stages] == [1, 2] else ["peak_memory.json: not ZeRO-1 and ZeRO-2"]
    for st in stages:
        if st.get("largest") is None:
            problems.append(f"ZeRO-{st['zero_stage']}: no batch size fits" + (f" ({st['error']})" if "error" in st
                                                                               else ""))
        if not s.dry_run and not any("peak_gib" in t for t in st.get("trials", [])):
            problems.append(f"ZeRO-{st['zero_stage']}: no peak memory")
    return problems


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Suite], list[str]]
    gpu_seconds: int  # together TOTAL_SECONDS
    dry_seconds: int


STEPS = [
    Step("install", step_install, 40, 60),
    Step("moe_layer", step_moe_layer, 45, 60),
    Step("train_step", step_train_step, 70, 90),
    Step("train_step_compile", step_train_step_compile, 90, 90),
    Step("trainer", step_trainer, 70, 150),
    Step("gpu_tests", step_gpu_tests, 30, 120),
    Step("peak_memory", step_peak_memory, 75, 90),
]


def run_step(s: Suite, step: Step, total_deadline: float) -> dict:
    s.step, s.rcs, s.timed_out = step.name, [], False
    s.log.write_text("")
    s.json_path.unlink(missing_ok=True)  # an earlier run's figures are not this run's
    start = time.monotonic()
    s.deadline = min(start + (step.dry_seconds if s.dry_run else step.gpu_seconds), total_deadline)
    try:
        problems = step.run(s)
    except Exception as exc:  # a bug of the step itself: reported like a failed command, and the suite goes on
        problems = [f"{type(exc).__name__}: {exc}"]
    failed = next((rc for rc in s.rcs if rc != 0), 0)
    return {"step": step.name, "rc": failed or (1 if problems else 0), "seconds": round(time.monotonic() - start, 1),
            "timed_out": s.timed_out, "problems": problems,
            "json": s.json_path.name if s.json_path.is_file() else None, "log": s.log.name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="where the logs, JSON and summary.json go (created)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nothing installed")
    parser.add_argument("--steps", nargs="+", choices=[step.name for step in STEPS], default=None,
                        help="run only these steps (default: all, in order)")
    args = parser.parse_args(argv)
    suite = Suite(Path(args.out_dir).resolve(), args.dry_run)
    suite.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    total_deadline = started + (sum(step.dry_seconds for step in STEPS) if args.dry_run else TOTAL_SECONDS)
    summary = {"mode": "dry-run" if args.dry_run else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "steps": []}
    for step in STEPS:
        if args.steps and step.name not in args.steps:
            continue
        print(f"== {step.name}", flush=True)
        row = run_step(suite, step, total_deadline)
        summary["steps"].append(row)
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["ok"] = all(r["rc"] == 0 for r in summary["steps"])
        (suite.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"== {step.name}: rc {row['rc']} in {row['seconds']} s{' (timed out)' if row['timed_out'] else ''}"
              + "".join(f"\n   {p}" for p in row["problems"]), flush=True)
        if row["rc"]:
            print("".join(suite.log.read_text().splitlines(keepends=True)[-20:]), flush=True)
    print(f"| {'step':<20} | rc  | seconds | timed out |\n|{'-' * 22}|-----|---------|-----------|")
    for r in summary["steps"]:
        print(f"| {r['step']:<20} | {r['rc']:>3} | {r['seconds']:7.1f} | {'yes' if r['timed_out'] else 'no':>9} |")
    print(f"suite: {summary['seconds']} s, {'all steps passed' if summary['ok'] else 'some steps failed'}; "
          f"{suite.out}/summary.json")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
