"""A file-based registry of LoRA adapters, shared by training (which publishes) and serving (which loads).

    <root>/<name>/v0001/adapter_config.json, adapter_model.safetensors
    <root>/<name>/CURRENT        -> "1"
    <root>/jobs/<job id>/<name>/…  a job's own registry (`registry_root`): served to that job only, as
                                   `<model>:<job id>/<name>`, a name the gateway's grammar never accepts

Publishing checks the files (whole, LoRA, shapes of the base), copies them into a fresh version directory and then replaces CURRENT atomically, so a reader sees either
the old or the new version, never a half-written one. Versions are never rewritten in place: serving loads
each version under its own name (`<model>:<name>@v<N>`), so a newer adapter can never be answered from the
weights of an older one that vLLM still holds.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import tempfile
from pathlib import Path

from .adapter_files import AdapterFileError, verify_adapter

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # also the promotion request's (gateway schema and check)
_NAME = re.compile(NAME_PATTERN)
_SCOPE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
JOBS_DIR = "jobs"  # under the served root: every job's own registry; never an adapter's name


class AdapterError(ValueError):
    pass


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name and name != JOBS_DIR  # fullmatch: no trailing newline


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or ".." in name:
        raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_' and '-' only")
    if name == JOBS_DIR:
        raise AdapterError(f"{JOBS_DIR!r} is reserved: it holds the jobs' own registries")


def registry_root(root: str | os.PathLike[str], scope: str | None = None) -> Path:
    """The served registry, or job `scope`'s own one beneath it (what a job publishes to and decides in)."""
    if scope is None:
        return Path(root)
    if not _SCOPE.match(scope):
        raise AdapterError(f"invalid registry scope {scope!r}: lowercase letters, digits and '-' only")
    return Path(root) / JOBS_DIR / scope


def run_registry(serving) -> Path | None:
    """Where a run (`serving`: its `ServingConfig`) publishes adapters and records gate decisions: the served
    registry, or its own under it (`adapter_scope`); None without a registry."""
    return registry_root(serving.adapter_root, serving.adapter_scope) if serving.adapter_root else None


def locate(root: str | os.PathLike[str], ref: str) -> tuple[Path, str]:
    """`<name>` in the served registry, or `<scope>/<name>` in a job's own: (its registry root, its name)."""
    scope, _, name = ref.rpartition("/")
    return registry_root(root, scope or None), name


def publish(root: str | os.PathLike[str], name: str, src: str | os.PathLike[str], base_model: str | None = None) -> int:
    """A new version of `name` holding `src`'s files, once they are checked (`adapter_files.verify_adapter`:
    against `base_model`'s weight shapes when given): a half-copied, corrupt or mismatched adapter is refused here,
    before any replica could load it."""
    _check_name(name)
    src = Path(src)
    missing = [f for f in ADAPTER_FILES if not (src / f).is_file()]
    if missing:
        raise AdapterError(f"{src} is not a LoRA adapter directory: missing {missing}")
    try:
        verify_adapter(src, base_model)
    except AdapterFileError as e:
        raise AdapterError(f"refused to publish {name!r}: {e}") from None
    base = Path(root) / name
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=base))
    for f in ADAPTER_FILES:
        shutil.copy2(src / f, tmp / f)
    version = 1 + max(_versions(base), default=0)
    os.rename(tmp, base / f"v{version:04d}")
    _make_current(base, version)
    return version


def _versions(base: Path) -> list[int]:
    return [int(p.name[1:]) for p in base.glob("v[0-9]*") if p.name[1:].isdigit()]


def _make_current(base: Path, version: int) -> None:
    current_tmp = base / f".CURRENT.{os.getpid()}"
    current_tmp.write_text(f"{version}\n")
    os.replace(current_tmp, base / "CURRENT")


def current(root: str | os.PathLike[str], name: str) -> tuple[int, Path]:
    _check_name(name)
    base = Path(root) / name
    try:
        version = int((base / "CURRENT").read_text().strip())
    except FileNotFoundError:
        raise AdapterError(f"no adapter named {name!r} under {root}") from None
    return version, base / f"v{version:04d}"


def version(root: str | os.PathLike[str], name: str, number: int) -> tuple[int, Path]:
    _check_name(name)
    path = Path(root) / name / f"v{number:04d}"
    if not (path / ADAPTER_FILES[1]).is_file():
        raise AdapterError(f"no version {number} of adapter {name!r} under {root}")
    return number, path


def list_current(root: str | os.PathLike[str]) -> dict[str, int]:
    out = {}
    for d in sorted(Path(root).glob("*/CURRENT")):
        out[d.parent.name] = int(d.read_text().strip())
    return out


def ensure_published(root: str | os.PathLike[str], name: str, src: str | os.PathLike[str], base_model: str | None = None) -> int:
    """The current version of `name` when it holds exactly `src`'s files; else the newest version that does, made
    current again (a run re-invoked after another config's run, which published its own adapter under the same
    name, added a copy per invocation before); else a new version of them."""
    _check_name(name)
    base = Path(root) / name
    try:
        now, _ = current(root, name)
    except AdapterError:
        now = None
    for version in sorted(_versions(base), key=lambda v: (v != now, -v)):
        if _same_files(Path(src), base / f"v{version:04d}"):
            if version != now:
                _make_current(base, version)
            return version
    return publish(root, name, src, base_model)


def _same_files(a: Path, b: Path) -> bool:
    try:
        return all(filecmp.cmp(a / f, b / f, shallow=False) for f in ADAPTER_FILES)
    except FileNotFoundError:
        return False
