"""One config per run (nanoGPT style): each stage's settings are one plain dict, resolved from the profile with
``--set key=value`` overrides, validated, saved in the run folder, and hashed into the run's key.

* :func:`stage_config` -- a stage's dict from the profile (unknown keys are an error naming the key and the
  valid ones, whether they come from the profile or from an override).
* :func:`with_overrides` / :func:`parse_sets` -- the CLI's ``--set lr=1e-4`` (or ``--set sft.lr=1e-4``): a
  new profile whose stage dicts carry the overrides, so every function downstream sees them.
* :func:`run_key` -- the cache key of a run: a hash of its config and of its parent's key (the model it starts
  from, the data it reads). :func:`claim_run_folder` keeps the run of the current key at the folder's usual
  name (``sft-cot-seed0``, ...): a run with another key is parked under ``.by-key/`` and comes back when its
  config is asked for again. So a changed setting is a new run, and an identical one is reused.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .io import write_json

__all__ = ["ConfigError", "STAGES", "stage_keys", "stage_config", "parse_sets", "with_overrides", "run_key",
           "digest", "file_digest", "claim_run_folder", "read_run_info", "check_keys", "discard_run"]


class ConfigError(ValueError):
    """A setting that does not exist or does not parse; the message names it and the valid ones."""


#: Stages with a settings dict in the profile (``Profile.<stage>``); pretraining has its own (pretrain.py).
STAGES = ("concepts", "cot", "sft", "tapo", "eval")

#: SFT settings that no profile needs to set (they default to off); every other key comes from the profile.
SFT_OPTIONAL = {"max_steps": None, "lora": None, "gradient_checkpointing": False, "replay_tasks": None}


def stage_keys(stage: str, profile=None) -> set[str]:
    """The settings a stage accepts."""
    from .profiles import PROFILES, SFT_BASE

    if stage == "sft":
        return set(SFT_BASE) | set(SFT_OPTIONAL)
    if stage == "tapo":
        from .tapo import TapoConfig

        return ({f.name for f in dataclasses.fields(TapoConfig)} - {"seed"}) | {"epochs", "seeds"}
    if stage in ("concepts", "cot"):
        keys = set()
        for p in PROFILES.values():
            keys |= set(getattr(p, stage))
        return keys
    if stage == "eval":
        return {"max_new_tokens", "batch_size", "seeds", "clip", "analysis"}
    raise ConfigError(f"unknown stage {stage!r}; stages with settings: {', '.join(STAGES)}")


def check_keys(stage: str, keys, where: str) -> None:
    valid = stage_keys(stage)
    unknown = sorted(set(keys) - valid)
    if unknown:
        raise ConfigError(f"unknown {stage} setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"({where}); valid {stage} settings: {', '.join(sorted(valid))}")


def stage_config(profile, stage: str, overrides: dict | None = None) -> dict:
    """The settings of ``stage`` for ``profile`` (the profile's dict, then ``overrides``), validated."""
    from .profiles import get_profile

    profile = get_profile(profile)
    base = dict(getattr(profile, stage))
    check_keys(stage, base, f"profile {profile.name!r}")
    check_keys(stage, overrides or {}, "override")
    cfg = {**base, **(overrides or {})}
    if stage == "sft":
        cfg = {**SFT_OPTIONAL, **cfg}
    return cfg


def _parse_value(text: str) -> Any:
    """``1e-4`` -> 0.0001, ``true`` -> True, ``[1, 2]`` -> [1, 2], ``null`` -> None, anything else a string."""
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return {"True": True, "False": False, "None": None}.get(text, text)


def parse_sets(items, stage: str | None = None) -> dict[str, dict]:
    """``["lr=1e-4", "tapo.gamma=0.5"]`` -> ``{"<stage>": {"lr": 1e-4}, "tapo": {"gamma": 0.5}}``: a bare key
    belongs to ``stage`` (the command's); ``stage.key`` names another. Unknown stages or keys raise ConfigError."""
    out: dict[str, dict] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set lr=1e-4)")
        st, dot, name = key.partition(".")
        if not dot:
            if stage is None:
                raise ConfigError(f"--set {item!r}: name the stage, e.g. --set sft.{key}=...")
            st, name = stage, key
        if st not in STAGES:
            raise ConfigError(f"--set {item!r}: unknown stage {st!r}; stages with settings: {', '.join(STAGES)}")
        check_keys(st, [name], f"--set {item}")
        out.setdefault(st, {})[name] = _parse_value(value.strip())
    return out


def with_overrides(profile, sets: dict[str, dict] | None):
    """A copy of ``profile`` whose stage dicts carry ``sets`` (from :func:`parse_sets`), validated."""
    from .profiles import get_profile

    profile = get_profile(profile)
    if not sets:
        return profile
    changes = {}
    for stage, values in sets.items():
        stage_config(profile, stage, values)  # validates
        changes[stage] = {**getattr(profile, stage), **values}
    return profile.replace(**changes)


# --------------------------------------------------------------------------------------------------- keys


def digest(obj: Any, n: int = 16) -> str:
    """A short stable hash of a JSON-able object (keys sorted; tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


_FILE_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 (16 hex digits) of a file's bytes, cached per (path, size, mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()[:16]
    return _FILE_DIGESTS[key]


def run_key(stage: str, config: dict, parent: Any) -> str:
    """The cache key of a run: its stage, its config and its parent's key (model and data it starts from)."""
    return digest({"stage": stage, "config": config, "parent": parent})


RUN_INFO = "run.json"


def read_run_info(folder: str | os.PathLike) -> dict | None:
    """``run.json`` of a run folder (key, stage, config, parent), or None."""
    try:
        info = json.loads((Path(folder) / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "key" in info else None


def claim_run_folder(folder: str | os.PathLike, key: str, info: dict,
                     legacy_matches: Callable[[Path], bool] | None = None) -> tuple[Path, bool]:
    """Make ``folder`` hold the run of ``key``; returns (folder, whether it already held that run).

    * it holds ``key`` already: kept (a finished run is reused, an interrupted one resumes);
    * it holds another run: that one is parked in ``.by-key/<name>@<its key>`` (kept, not deleted), and a run
      of ``key`` parked earlier comes back; otherwise the folder starts empty;
    * a folder from before run keys (no ``run.json``): adopted when ``legacy_matches(folder)`` says its
      settings are these, else parked as ``<name>@unkeyed``.
    ``info`` (config, parent, ...) is written to ``folder/run.json`` with the key.
    """
    folder = Path(folder)
    parked = folder.parent / ".by-key"
    current = read_run_info(folder) if folder.exists() else None
    if current is not None and current["key"] == key:
        return folder, True
    if folder.exists() and current is None and legacy_matches is not None and legacy_matches(folder):
        write_json(folder / RUN_INFO, {**info, "key": key, "adopted": True})
        return folder, True
    if folder.exists():
        target = parked / f"{folder.name}@{current['key'] if current else 'unkeyed'}"
        parked.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    mine = parked / f"{folder.name}@{key}"
    back = mine.is_dir() and (read_run_info(mine) or {}).get("key") == key
    if back:
        os.replace(mine, folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / RUN_INFO, {**info, "key": key})
    return folder, back


def discard_run(folder: str | os.PathLike, key: str) -> None:
    """Start the run of ``key`` over (``fresh=True``): remove it from ``folder`` (and a folder without a key)
    and from ``.by-key/``; a run of another key in ``folder`` is kept (:func:`claim_run_folder` parks it)."""
    folder = Path(folder)
    parked = folder.parent / ".by-key" / f"{folder.name}@{key}"
    if parked.exists():
        shutil.rmtree(parked)
    if folder.exists() and (read_run_info(folder) or {"key": key})["key"] == key:
        shutil.rmtree(folder)
