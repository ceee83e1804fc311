"""The replay store: generations and feedback, durable, shared by server and trainer."""

from feedloop.core.store.base import (
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
    ShadowScore,
    StoreCounts,
)
from feedloop.core.store.factory import open_store
from feedloop.core.store.outcomes import VersionOutcomes

__all__ = [
    "FeedbackRecord",
    "GenerationRecord",
    "ReplayStore",
    "ShadowScore",
    "StoreCounts",
    "VersionOutcomes",
    "open_store",
]
