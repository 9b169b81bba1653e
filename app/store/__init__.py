"""Persistence: every SQL statement of the app lives in this package."""

from app.store.base import (
    BuildRecord,
    Conflict,
    Delivery,
    EventRecord,
    Installation,
    NewToken,
    Repository,
    RolloutRecord,
    RuntimeVersionRecord,
    StatusCounts,
    Store,
    StoreError,
    TokenRecord,
)
from app.store.lock import InstanceLock
from app.store.sqlite import SqliteStore

__all__ = [
    "BuildRecord",
    "Conflict",
    "Delivery",
    "EventRecord",
    "Installation",
    "InstanceLock",
    "NewToken",
    "Repository",
    "RolloutRecord",
    "RuntimeVersionRecord",
    "SqliteStore",
    "StatusCounts",
    "Store",
    "StoreError",
    "TokenRecord",
]
