"""Ticket-search methods and modifiers on one extension point (`lth.methods.base`).

Every module of this package is imported here, so a method or modifier is one new file that
registers itself (`METHODS.register` / `MODIFIERS.register`, and `lth.hparams.register_section`
for its flags)."""
import importlib
import pkgutil

from lth.methods.base import (METHODS, MODIFIERS, Hooks, Method, Modifier, Phase, Plan,
                              RunContext, derive_seed, generator, providers)
from lth.methods.branches import BRANCHES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BRANCHES", "METHODS", "MODIFIERS", "Hooks", "Method", "Modifier", "Phase", "Plan",
           "RunContext", "derive_seed", "generator", "providers"]
