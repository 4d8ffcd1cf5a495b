"""Collects what the input pipeline skipped, warns once per item, and prints one summary."""

from __future__ import annotations

import collections
import logging

logger = logging.getLogger("mrcnn_tf.data")


class DataError(ValueError):
    """Input that cannot be used at all (an empty or non-COCO annotation file, ...)."""


class DataReport:
    """Skipped images/annotations with reasons. ``warn`` logs one line naming the item."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[tuple[str, object, str]] = []

    def warn(self, kind: str, ident, reason: str) -> None:
        self.items.append((kind, ident, reason))
        logger.warning("%s: skipped %s %s: %s", self.source, kind, ident, reason)

    def counts(self) -> dict:
        return dict(collections.Counter(reason_key(r) for _, _, r in self.items))

    def summary(self) -> str:
        if not self.items:
            return f"{self.source}: nothing skipped"
        by_kind = collections.Counter(k for k, _, _ in self.items)
        parts = ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in sorted(by_kind.items()))
        reasons = "; ".join(f"{n} x {r}" for r, n in sorted(self.counts().items()))
        return f"{self.source}: skipped {parts} ({reasons})"

    def log_summary(self) -> None:
        logger.warning(self.summary()) if self.items else logger.info(self.summary())


def reason_key(reason: str) -> str:
    """The reason without its specifics (the part before the first colon)."""
    return reason.split(":", 1)[0]
