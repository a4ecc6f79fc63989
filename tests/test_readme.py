"""The README's "Using it" commands run as written, after a short demo, in a copy of the repository (the copy's
``.venv`` and ``.cache`` are this checkout's): what a newcomer types works."""

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run

pytestmark = pytest.mark.slow


def using_it_commands(readme: str) -> str:
    """The first bash block under "## Using it", as a script (comments and continuations as written)."""
    section = readme.split("\n## Using it\n", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "no bash block under ## Using it"
    return match.group(1)


def test_using_it_block_is_found_and_each_launcher_gets_its_own_run_folder():
    script = using_it_commands((REPO / "README.md").read_text())
    commands = [line for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[0].startswith(". .venv/bin/activate")
    folders = re.findall(r"run\.output_dir=(\S+)", script)
    assert len(folders) == len(set(folders)) >= 3  # a second run in one folder would resume, not train


def _copy_checkout(dest):
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=False)
    if listed.returncode != 0:  # not a git checkout: everything but the run products
        shutil.copytree(REPO, dest, symlinks=True,
                        ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "data", "runs", "__pycache__"))
    else:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (REPO / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, dest / name)
    for shared in (".venv", ".cache"):
        (dest / shared).symlink_to(REPO / shared, target_is_directory=True)


def test_readme_using_it_runs_as_written_after_the_demo(tmp_path):
    if not (REPO / ".venv" / "bin" / "activate").is_file():
        pytest.skip("needs the checkout's .venv (scripts/setup_env.sh)")
    # demo.sh runs setup_env.sh in the copy: with a stale install stamp it would reinstall the shared .venv's
    # editable package from the copy (a temporary folder). Refuse instead.
    stamp = hashlib.sha256((REPO / "setup.cfg").read_bytes() + (REPO / "requirements/cpu-constraints.txt").read_bytes())
    installed = REPO / ".venv" / ".condmoe-installed"
    if not installed.is_file() or installed.read_text().strip() != stamp.hexdigest():
        pytest.fail("the .venv install is out of date with setup.cfg: run `bash scripts/setup_env.sh` first")
    copy = tmp_path / "condmoe"
    copy.mkdir()
    _copy_checkout(copy)
    run(["bash", "scripts/demo.sh", "run.max_steps=100"], cwd=copy, timeout=900)
    script = copy / "using_it.sh"
    script.write_text("set -euo pipefail\n" + using_it_commands((copy / "README.md").read_text()))
    proc = run(["bash", str(script)], cwd=copy, timeout=1200)
    where = subprocess.run([sys.executable, "-c", "import condmoe; print(condmoe.__file__)"], capture_output=True,
                           text=True, cwd="/", check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(REPO.resolve()), where  # the shared install still points here
    for folder, steps in (("torchrun", 50), ("deepspeed", 50), ("mpirun", 50), ("demo_modsquad", 100)):
        assert (copy / "runs" / folder / "checkpoints" / f"step_{steps}").is_dir(), (folder, proc.stdout[-3000:])
    assert (copy / "runs" / "torchrun" / "eval.json").is_file()
    assert list((copy / "runs" / "demo_modsquad" / "experts").glob("*.json"))
