"""Shared fixtures: each model is loaded once per test session (CPU, float32 so logits compare)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prepared(name: str) -> None:
    """Build a zoo model the first time a test needs it (`make test` builds them before pytest starts)."""
    from kvcat.models import ModelError, is_prepared, prepare

    if not is_prepared(name):
        try:
            prepare(name)
        except ModelError as exc:
            pytest.fail(f"model {name} could not be prepared ({exc}); run `make setup`")


def _load(name: str):
    from kvcat.models import load_model

    _prepared(name)
    return load_model(name, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny():
    """2-layer random GQA Llama with SmolLM2's tokenizer: plumbing tests."""
    return _load("tiny-random")


@pytest.fixture(scope="session")
def small():
    """First 6 layers of SmolLM2-135M: small, with trained attention heads."""
    return _load("smollm2-135m-6l")


@pytest.fixture(scope="session")
def smollm2():
    """The full SmolLM2-135M."""
    return _load("smollm2-135m")


def kvcat_server_process(root: Path, model: str = "smollm2-135m", **kwargs):
    """`kvcat serve` started on a free loopback port (fp32 engine, so logits compare); the caller stops it."""
    from kvcat.server.launch import ServerProcess, ServerStartError

    _prepared(model)
    kwargs = {"dtype": "float32", "max_model_len": 4096, "store_dir": root / "store",
              "log_path": root / "server.log", **kwargs}
    srv = ServerProcess(model, **kwargs)
    try:
        return srv.start()
    except ServerStartError as exc:
        pytest.fail(str(exc))


@contextmanager
def kvcat_server(root: Path, model: str = "smollm2-135m", **kwargs):
    """`kvcat_server_process`, stopped on exit."""
    srv = kvcat_server_process(root, model, **kwargs)
    try:
        yield srv
    finally:
        srv.stop()


AUTO_THRESHOLD, AUTO_RATIO = 1024, 4.0  # on-the-fly compaction of the shared server (tests/test_onthefly.py)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One `kvcat serve` for the tests of the served path, with on-the-fly compaction on for long prompts."""
    root = tmp_path_factory.mktemp("server")
    args = ["--auto-compact-threshold", str(AUTO_THRESHOLD), "--auto-compact-ratio", str(AUTO_RATIO)]
    for item in os.environ.get("KVCAT_TEST_ENGINE_ARGS", "").split():  # e.g. a GPU's backend (gpu_check.sh)
        args += ["--engine-arg", item]
    with kvcat_server(root, args=args) as srv:
        yield {"base": srv.base, "store": root / "store", "proc": srv.proc, "client": srv.openai(timeout=600)}
