"""Per-model profiles that methods measure once and keep (the budgets' cost curves, the heads' retrieval scores):
in memory per process, and as one JSON file per model under $KVCAT_HOME/<folder>/<fingerprint>.json, measured
again when the file's version or fingerprint does not match."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from kvcat.config import kvcat_home
from kvcat.models import LoadedModel

log = logging.getLogger(__name__)


class ProfileStore:
    def __init__(self, folder: str, version: int):
        self.folder, self.version = folder, version
        self.memo: dict[str, dict] = {}  # fingerprint -> profile

    def path(self, lm: LoadedModel) -> Path:
        return kvcat_home() / self.folder / f"{lm.spec.fingerprint}.json"

    def load(self, lm: LoadedModel, compute: Callable[[], dict], refresh: bool = False) -> dict:
        """Memory, then the model's file, else `compute()` (stored; a home that cannot be written to only logs)."""
        fp = lm.spec.fingerprint
        if not refresh and fp in self.memo:
            return self.memo[fp]
        path = self.path(lm)
        if not refresh and path.is_file():
            try:
                prof = json.loads(path.read_text())
                if prof.get("version") == self.version and prof.get("fingerprint") == fp:
                    self.memo[fp] = prof
                    return prof
            except (OSError, json.JSONDecodeError):
                pass
        prof = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(prof))
            tmp.replace(path)
        except OSError as exc:
            log.warning("could not store the %s profile at %s (%s)", self.folder, path, exc)
        self.memo[fp] = prof
        return prof
