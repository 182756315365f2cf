"""Optional imports, in one place, each with a message that says how to get the package."""

from __future__ import annotations

import importlib
from types import ModuleType

from lightning_utilities.core.imports import RequirementCache

__all__ = ["GRAPH_TOOL_AVAILABLE", "require_graph_tool"]

#: graph-tool is optional and not on PyPI (checked without importing it).
GRAPH_TOOL_AVAILABLE = RequirementCache(module="graph_tool")


def require_graph_tool() -> ModuleType:
    """Import graph-tool or raise an ImportError that explains how to install it."""
    if not GRAPH_TOOL_AVAILABLE:
        raise ImportError(
            "graph-tool is not installed. It is optional and not on PyPI: install it with conda "
            "(`conda install -c conda-forge graph-tool`) or your system packages (Debian/Ubuntu: "
            "`apt install python3-graph-tool`). The adjacency graph itself is available without it as a "
            "scipy sparse matrix: `partition.adjacency()`."
        )
    return importlib.import_module("graph_tool")
