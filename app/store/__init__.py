"""Persistence: every SQL statement of the app lives in this package."""

from app.store.base import (
    BuildRecord,
    Conflict,
    Delivery,
    Effect,
    EventRecord,
    FoundVersion,
    Installation,
    NewEffect,
    NewToken,
    OutboxStats,
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
    "Effect",
    "EventRecord",
    "FoundVersion",
    "Installation",
    "InstanceLock",
    "NewEffect",
    "NewToken",
    "OutboxStats",
    "Repository",
    "RolloutRecord",
    "RuntimeVersionRecord",
    "SqliteStore",
    "StatusCounts",
    "Store",
    "StoreError",
    "TokenRecord",
]
