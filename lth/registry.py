"""One registry per pluggable axis (models, datasets, pruning strategies, methods, branches).

A registry maps a name to a builder plus a one-line description; the CLI's `choices` and its help
text come from here, so registering is all it takes to make a new entry selectable.
"""
from __future__ import annotations

from typing import Callable


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[Callable, str]] = {}

    def register(self, name: str, description: str = ""):
        def decorator(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = (fn, description)
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name][0]

    def description(self, name: str) -> str:
        self.get(name)
        return self._entries[name][1]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def help(self) -> str:
        return "; ".join(f"{n}: {d}" if d else n for n, (_, d) in self._entries.items())
