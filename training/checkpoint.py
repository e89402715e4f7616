"""Checkpoints: the output folder is a standard HF model folder plus the state needed to resume.

    OUT/config.json, model.safetensors, tokenizer*, generation_config.json   plain transformers / vLLM
    OUT/kvcat_training.json     run metadata: policy, retention, steps, data, base-model fingerprint
    OUT/train_log.jsonl         one JSON line per logged step
    OUT/trainer_state/          optimizer.pt, policy.pt (router weights), rng.pt, state.json

A new run first claims OUT with its metadata alone (steps 0), so a different run is refused from the start.

The router is not part of the model weights: it lives only in trainer_state/, for resuming.
Saves are atomic: everything is written to a temporary sibling folder, which then replaces OUT by two
renames (OUT -> .OUT.old, tmp -> OUT). A save interrupted while writing leaves OUT untouched; one interrupted
between the renames leaves .OUT.old, which `recover` puts back before anything reads OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

META_FILE = "kvcat_training.json"
LOG_FILE = "train_log.jsonl"
STATE_DIR = "trainer_state"
FORMAT_VERSION = 1


class OutputFolderError(ValueError):
    """The output folder holds something other than a checkpoint of this run."""


def _old(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def recover(out: str | os.PathLike) -> None:
    """Finish or undo a save that was interrupted (call before reading OUT; idempotent)."""
    out = Path(out)
    old = _old(out)
    if old.exists():
        if out.exists():  # the new checkpoint was in place; only the clean-up was missing
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _finish_tree(path: Path) -> None:
    """Flush every file to disk, and give the tree ordinary permissions (mkdtemp makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for f in path.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_save(out: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_folder), then make that folder OUT; an exception or a kill leaves OUT as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _finish_tree(tmp)
        old = _old(out)
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_meta(out: str | os.PathLike) -> dict | None:
    path = Path(out) / META_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_output_folder(out: str | os.PathLike, run_key: str, repair: bool = True) -> dict | None:
    """None for a fresh run; this run's metadata to resume from; OutputFolderError for anything else.
    `repair` finishes an interrupted save first (only one process of a torchrun group may do it)."""
    out = Path(out)
    if repair:
        recover(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    meta = read_meta(out)
    if meta is None:
        raise OutputFolderError(f"{out} is not empty and holds no {META_FILE}: it is not a kvcat training "
                                "folder; choose another --out")
    if meta.get("run_key") != run_key:
        c = meta.get("config", {})
        raise OutputFolderError(
            f"{out} holds another run (model {c.get('model')}, policy {c.get('policy')}, retention "
            f"{c.get('retention')}, seq-len {c.get('seq_len')}, run key {meta.get('run_key')}); choose another "
            "--out, or delete that folder to start over")
    if not (out / STATE_DIR / "state.json").is_file():
        if meta.get("steps") == 0:  # claimed by this run, which was stopped before its first checkpoint
            return None
        raise OutputFolderError(f"{out} holds a finished model of this run without its trainer state; "
                                "it cannot be resumed: choose another --out")
    return meta


def read_log(out: str | os.PathLike, up_to_step: int | None = None) -> list[dict]:
    path = Path(out) / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if up_to_step is None or row["step"] <= up_to_step:
            rows.append(row)
    return rows
