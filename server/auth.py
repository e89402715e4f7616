"""API keys: Bearer tokens, each bound to a tenant; a tenant sees and uses only its own contexts.

Keys come from a file (`--api-keys-file`, JSON or YAML: `{"keys": [{"tenant": "acme", "key": "..."}],
"protect_metrics": false, "protect_health": false}`) and/or the environment (`KVCAT_API_KEYS=
"acme:key1,globex:key2"`). Only SHA-256 digests of the keys are kept; a presented key is hashed and compared
with every stored digest in constant time (`hmac.compare_digest`, no early exit), and keys are never logged.
With no key configured every request belongs to the tenant "default" and the server binds to loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TENANT = "default"
ENV_KEYS = "KVCAT_API_KEYS"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class AuthConfigError(ValueError):
    """A malformed key file or KVCAT_API_KEYS value."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Auth:
    keys: tuple[tuple[bytes, str], ...] = ()  # (sha256 of the key, tenant)
    protect_metrics: bool = False
    protect_health: bool = False
    tenants: frozenset[str] = field(default=frozenset())

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: str | None = None,
             protect_metrics: bool | None = None, protect_health: bool | None = None) -> "Auth":
        """Keys from the file and the environment variable (both optional); flags override the file's."""
        pairs: list[tuple[str, str]] = []
        file_opts: dict = {}
        if path is not None:
            pairs += _from_file(Path(path), file_opts)
        raw = os.environ.get(ENV_KEYS, "") if env is None else env
        for i, item in enumerate(x.strip() for x in raw.split(",") if x.strip()):
            tenant, sep, key = item.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise AuthConfigError(f"{ENV_KEYS} entry {i + 1} is not 'tenant:key'")
            pairs.append((tenant.strip(), key.strip()))
        seen: dict[bytes, str] = {}
        for tenant, key in pairs:
            if len(key) < 16:
                raise AuthConfigError(f"the key of tenant {tenant!r} is shorter than 16 characters")
            d = _digest(key)
            if d in seen and seen[d] != tenant:
                raise AuthConfigError(f"one key is given to two tenants ({seen[d]!r} and {tenant!r})")
            seen[d] = tenant
        pm = file_opts.get("protect_metrics", False) if protect_metrics is None else protect_metrics
        ph = file_opts.get("protect_health", False) if protect_health is None else protect_health
        return cls(tuple(seen.items()), bool(pm), bool(ph), frozenset(seen.values()))

    def tenant_of(self, authorization: str | None) -> str | None:
        """The tenant of an `Authorization: Bearer <key>` header, or None for a missing or wrong key
        (`DEFAULT_TENANT` when no key is configured)."""
        if not self.enabled:
            return DEFAULT_TENANT
        scheme, _, token = (authorization or "").partition(" ")
        presented = _digest(token.strip()) if scheme.lower() == "bearer" else b"\0" * 32
        found = None
        for digest, tenant in self.keys:  # every digest is compared: the time does not depend on which matched
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def bind_host(host: str, auth: Auth) -> tuple[str, str | None]:
    """The address to listen on, and why it differs from `host`: without keys, loopback only."""
    if auth.enabled or host in LOOPBACK:
        return host, None
    return "127.0.0.1", (f"no API keys configured, so listening on 127.0.0.1 only instead of {host} (give "
                         f"--api-keys-file or {ENV_KEYS} to serve other hosts)")


def _from_file(path: Path, opts: dict) -> list[tuple[str, str]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AuthConfigError(f"cannot read the API key file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except ValueError as exc:
        raise AuthConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise AuthConfigError(f"{path}: expected a mapping with a 'keys' list")
    opts.update({k: data[k] for k in ("protect_metrics", "protect_health") if k in data})
    out = []
    for i, entry in enumerate(data["keys"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("tenant"), str) or not isinstance(
                entry.get("key"), str):
            raise AuthConfigError(f"{path}: keys[{i}] needs string fields 'tenant' and 'key'")
        out.append((entry["tenant"], entry["key"]))
    return out


def _yaml(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
