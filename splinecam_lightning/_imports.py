"""Optional imports, in one place, each with a message that says how to get the package."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["module_available", "require_graph_tool"]


def module_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require_graph_tool() -> ModuleType:
    """Import graph-tool or raise an ImportError that explains how to install it."""
    if not module_available("graph_tool"):
        raise ImportError(
            "graph-tool is not installed. It is optional and not on PyPI: install it with conda "
            "(`conda install -c conda-forge graph-tool`) or your system packages (Debian/Ubuntu: "
            "`apt install python3-graph-tool`). The adjacency graph itself is available without it as a "
            "scipy sparse matrix: `partition.adjacency()`."
        )
    return importlib.import_module("graph_tool")
