"""kvcat.compaction: KV-cache compaction methods, one dataclass each (see `base.py`), by name (`registry.py`).

    from kvcat.compaction import get_method
    cache = get_method("am-hak").compact(lm, context_ids, ratio=10)
"""

from kvcat.compaction.base import CompactionError, Method, slots_per_head
from kvcat.compaction.registry import METHODS, get_method, method_from_spec, method_names, parse_params, register

# the built-in methods register themselves, once, here
from kvcat.compaction import am, eviction, optimize  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "CompactionError", "Method", "get_method", "method_from_spec", "method_names", "parse_params",
           "register", "slots_per_head"]
