"""kvcat.compaction: KV-cache compaction methods behind one interface (see `base.py`).

    from kvcat.compaction import get_method
    cache = get_method("am-hak").compact(lm, context_ids, ratio=10)
"""

from kvcat.compaction.base import (METHODS, CompactionError, Method, get_method, method_names,  # noqa: F401
                                   resolve_budget)
from kvcat.compaction import am, eviction, optimize  # noqa: F401,E402  (register the methods)
