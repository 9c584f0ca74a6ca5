"""The service's allocator settings: :mod:`clipground.memory` (shared with the grounder, which trims too)."""

from ..memory import tune_allocator, trim

__all__ = ["trim", "tune_allocator"]
