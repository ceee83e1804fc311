"""The model registry: published versions, the live pointer, and the history of every decision.

The interface is in `base`, the backends in `directory` (the embedded default) and `postgres`
(shared by many machines), and `open_registry` picks one from a location.
"""

from feedloop.core.registry.base import (
    ACTIONS,
    PROMOTED,
    PUBLISHED,
    REFUSED,
    ROLLED_BACK,
    Decision,
    LivePointer,
    ModelRegistry,
)
from feedloop.core.registry.directory import DirectoryRegistry
from feedloop.core.registry.factory import open_registry

__all__ = [
    "ACTIONS",
    "PROMOTED",
    "PUBLISHED",
    "REFUSED",
    "ROLLED_BACK",
    "Decision",
    "DirectoryRegistry",
    "LivePointer",
    "ModelRegistry",
    "open_registry",
]
