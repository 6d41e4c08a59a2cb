"""What `python -m lth.train` needs beyond sparsekern's core dependencies (torch, numpy): the
packages of the `lth` extra in pyproject.toml. Checked before any flag is parsed or any folder
made, so a missing package is one line saying what to install, not a ModuleNotFoundError after
a half-made run folder."""
from __future__ import annotations

import importlib.util

# import name -> distribution name, the packages of pyproject.toml's `lth` extra (a test keeps the
# two lists equal; the versions live in pyproject.toml only)
LTH_EXTRA = {"sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib",
             "yaml": "pyyaml"}


def missing_lth_packages() -> list[str]:
    """Distribution names of the `lth` extra that cannot be imported here (found, not imported:
    loading matplotlib or scikit-learn costs a second)."""
    return [dist for module, dist in LTH_EXTRA.items() if importlib.util.find_spec(module) is None]


def lth_extra_problem() -> str | None:
    """One line naming what to install, or None when the `lth` extra is complete."""
    missing = missing_lth_packages()
    if not missing:
        return None
    return (f"python -m lth.train: error: missing {', '.join(missing)} (sparsekern's `lth` "
            f"extra): pip install {' '.join(missing)}   (or install sparsekern as "
            f"pip install --no-build-isolation '.[lth]')")
