"""The replay store: generations and feedback, durable, shared by server and trainer."""

from feedloop.core.store.base import (
    FeedbackRecord,
    GenerationRecord,
    ReplayStore,
    StoreCounts,
)
from feedloop.core.store.factory import open_store

__all__ = [
    "FeedbackRecord",
    "GenerationRecord",
    "ReplayStore",
    "StoreCounts",
    "open_store",
]
