"""What an install of sparsekern carries: every package of the repository, and the `lth` extra
that `python -m lth.train` checks for before it touches the disk. (The wheel itself is built,
installed into a fresh venv outside the repository and run by `make install-check` in CI.)"""
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from setuptools import find_packages

from lth import requirements

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_package_discovery_finds_every_package_of_the_repository():
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=REPO_ROOT, include=include))
    on_disk = {str(p.parent.relative_to(REPO_ROOT)).replace("/", ".")
               for top in ("sparsekern", "lth", "benchmarks")
               for p in (REPO_ROOT / top).rglob("__init__.py")}
    assert found == on_disk
    assert not any(name.startswith("tests") for name in found)


def test_the_check_names_exactly_the_lth_extra():
    extra = PYPROJECT["project"]["optional-dependencies"]["lth"]
    names = {re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].lower() for spec in extra}
    assert names == set(requirements.LTH_EXTRA.values())


def test_complete_extra_is_no_problem():
    assert requirements.missing_lth_packages() == []  # the dev venv has the extra
    assert requirements.lth_extra_problem() is None


# A None entry in sys.modules makes a module unimportable (find_spec returns None for it).
MISSING_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["sklearn"] = sys.modules["yaml"] = None
    from lth.requirements import lth_extra_problem
    print(lth_extra_problem())
""")


def test_missing_packages_are_one_line_naming_them_and_the_extra():
    done = subprocess.run([sys.executable, "-c", MISSING_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("python -m lth.train: error: missing scikit-learn, pyyaml ")
    assert "pip install scikit-learn pyyaml" in lines[0] and "'.[lth]'" in lines[0]


# `python -m lth.train` with scikit-learn and tqdm unimportable, run where a run folder would go
NO_EXTRA_SCRIPT = textwrap.dedent("""
    import runpy, sys
    sys.modules["sklearn"] = sys.modules["tqdm"] = None
    sys.argv = ["lth.train"]
    runpy.run_module("lth.train", run_name="__main__")
""")


def test_lth_train_without_the_extra_says_so_before_touching_the_disk(tmp_path):
    done = subprocess.run([sys.executable, "-c", NO_EXTRA_SCRIPT], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing scikit-learn, tqdm" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ folder, nothing half-made
