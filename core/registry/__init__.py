"""The model registry: published versions, the live pointer, and the history of every decision.

The interface is in `base`, the pointer and its changes in `pointer`, the backends in `directory`
(the embedded default) and `postgres` (shared by many machines), and `open_registry` picks one
from a location.
"""

from feedloop.core.registry.base import ModelRegistry
from feedloop.core.registry.directory import DirectoryRegistry
from feedloop.core.registry.factory import open_registry
from feedloop.core.registry.pointer import (
    ACTIONS,
    CANARY,
    PAUSED,
    PROMOTED,
    PUBLISHED,
    REFUSED,
    RESUMED,
    ROLLED_BACK,
    SHADOW,
    TRIAL_MODES,
    Decision,
    LivePointer,
    Trial,
)

__all__ = [
    "ACTIONS",
    "CANARY",
    "PAUSED",
    "PROMOTED",
    "PUBLISHED",
    "REFUSED",
    "RESUMED",
    "ROLLED_BACK",
    "SHADOW",
    "TRIAL_MODES",
    "Decision",
    "DirectoryRegistry",
    "LivePointer",
    "ModelRegistry",
    "Trial",
    "open_registry",
]
