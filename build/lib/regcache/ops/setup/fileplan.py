"""Planned, idempotent, undoable changes to files under a root directory (Python 3 standard library only).

Owns: what a tool wants a file to be (`WholeFile`, `JsonKey`), reading the current files
(`read_current`), computing the changes (`plan`, pure: it takes the wanted files, the current
files and the undo record and returns actions and the next undo record), and applying them
(`apply`: atomic writes, removals, directories). Knows nothing of docker, containerd or podman.

The undo record (`STATE_PATH`, JSON) keeps, per file a tool touched: the bytes and mode it had
before (none: the tool created it), a hash of what was last written, the directories created
for it, and which tools use it with which triggers (dockerd and containerd share the CA file in
the trust store: it goes only when the last of them is undone). Planning a tool with no wanted
files is its undo: every file it alone used goes back to what it was — unless someone changed
it since, then it is kept and said so (for JSON keys, only those keys go back).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

STATE_PATH = "/var/lib/regcache-setup/state.json"
# The undo record and its entries are JSON as read back from disk: checked where they are used.
JsonObject = dict[str, Any]
STATE_VERSION = 1


class SetupError(Exception):
    """Bad input or a file that cannot be edited safely; raised before anything is written."""


@dataclass(frozen=True)
class WholeFile:
    """A file whose whole content is ours. `only_if_missing`: a starting point (a config file) that
    is created when absent and never overwritten."""

    path: str
    content: bytes
    mode: int = 0o644
    triggers: frozenset[str] = frozenset()
    only_if_missing: bool = False

    def render(self, current: bytes | None) -> bytes:
        if self.only_if_missing and current is not None:
            return current
        return self.content


@dataclass(frozen=True)
class JsonKey:
    """Top-level keys of a JSON object file that holds other people's keys too (daemon.json).
    `values`: key → value, set as given. `prepended`: key → items put first in that key's list,
    the items already there after them (a user's own registry mirrors stay, behind ours)."""

    path: str
    values: tuple[tuple[str, object], ...] = ()
    prepended: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mode: int = 0o644
    triggers: frozenset[str] = frozenset()

    @property
    def keys(self) -> list[str]:
        return [key for key, _ in self.values] + [key for key, _ in self.prepended]

    def render(self, current: bytes | None) -> bytes:
        document = load_json_object(self.path, current)
        wanted = {**document, **dict(self.values)}
        for key, items in self.prepended:
            present = document.get(key)
            others = [item for item in present if item not in items] if isinstance(present, list) else []
            wanted[key] = [*items, *others]
        if wanted == document:
            return current if current is not None else dump_json(document)  # no reformatting for nothing
        return dump_json(wanted)


def load_json_object(path: str, content: bytes | None) -> JsonObject:
    if content is None or not content.strip():
        return {}
    try:
        document = json.loads(content)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise SetupError(f"{path} is not valid JSON ({err}); fix or remove it — nothing was changed") from err
    if not isinstance(document, dict):
        raise SetupError(f"{path} must hold a JSON object; nothing was changed")
    return document


def dump_json(document: JsonObject) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass(frozen=True)
class Current:
    """A file as it is now: bytes and mode (None: absent), and its ancestors that do not exist."""

    content: bytes | None
    mode: int | None = None
    missing_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileAction:
    """One line of output and what it does. `verb`: create, update, unchanged, remove, restore, keep."""

    verb: str
    path: str
    before: bytes | None = None
    after: bytes | None = None  # None with remove/unchanged/keep
    mode: int | None = None
    detail: str = ""
    create_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    actions: list[FileAction]
    triggered: frozenset[tuple[str, str]]  # (trigger, "install" | "uninstall") of files that change
    state_before: JsonObject
    state_after: JsonObject
    remove_dirs: tuple[str, ...] = ()  # created by tools for files that go now; removed when empty
    state_dirs: tuple[str, ...] = ()  # ancestors of the undo record that do not exist yet

    @property
    def state_changes(self) -> bool:
        return self.state_after != self.state_before


def empty_state() -> JsonObject:
    return {"version": STATE_VERSION, "files": {}, "state_dirs": []}


def plan(
    tool: str,
    wanted: list[WholeFile | JsonKey],
    current: dict[str, Current],
    state: JsonObject,
    state_missing_dirs: tuple[str, ...] = (),
) -> Plan:
    """The changes that make the files `wanted` by `tool` true, and revert those it wanted before
    but no longer does (all of them when `wanted` is empty: its undo). `current` has every path
    of `wanted` and of `state`; `state_missing_dirs`: the undo record's ancestors that are absent."""
    files: dict[str, JsonObject] = {path: dict(entry) for path, entry in state["files"].items()}
    actions: list[FileAction] = []
    triggered: set[tuple[str, str]] = set()
    for spec in wanted:
        now = current[spec.path]
        after = spec.render(now.content)
        mode = target_mode(spec.mode, now.mode)
        entry = files.get(spec.path)
        if isinstance(spec, JsonKey) and entry is not None:
            after = restore_dropped_keys(spec, entry, after)
        if after == now.content and mode == now.mode:
            actions.append(FileAction("unchanged", spec.path))
            if entry is None:  # there already, as we want it: record that it was there
                entry = new_entry(now, after)
        else:
            verb = "create" if now.content is None else "update"
            actions.append(FileAction(verb, spec.path, now.content, after, mode, create_dirs=now.missing_dirs))
            triggered.update((trigger, "install") for trigger in spec.triggers)
            entry = dict(entry) if entry is not None else new_entry(now, after)
            entry["written_sha256"] = sha256(after)
        entry["users"] = {**entry.get("users", {}), tool: sorted(spec.triggers)}
        if isinstance(spec, JsonKey):
            entry.pop("json_key", None)
            entry["json_keys"] = spec.keys
        files[spec.path] = entry

    wanted_paths = {spec.path for spec in wanted}
    remove_dirs: list[str] = []
    for path, entry in sorted(files.items()):
        users = dict(entry["users"])
        if tool not in users or path in wanted_paths:
            continue
        triggers = users.pop(tool)
        if users:
            files[path] = {**entry, "users": users}
            actions.append(FileAction("keep", path, detail="still used by setup-" + ", setup-".join(sorted(users))))
            continue
        del files[path]
        action = revert(path, entry, current[path])
        actions.append(action)
        if action.after is not None or action.verb == "remove":
            triggered.update((trigger, "uninstall") for trigger in triggers)
        if action.verb != "keep":
            remove_dirs += entry.get("created_dirs", [])

    state_after: JsonObject = {"version": STATE_VERSION, "files": files, "state_dirs": []}
    state_dirs: tuple[str, ...] = ()
    if files:
        state_dirs = state_missing_dirs
        state_after["state_dirs"] = sorted({*state.get("state_dirs", []), *state_dirs})
    else:
        remove_dirs += state.get("state_dirs", [])
        state_after = empty_state()
    return Plan(
        actions,
        frozenset(triggered),
        state,
        state_after,
        tuple(sorted(set(remove_dirs), key=lambda d: (-d.count("/"), d))),  # deepest first
        state_dirs,
    )


def target_mode(wanted: int, now: int | None) -> int:
    """A new file gets `wanted`; an existing one keeps its own, except that a secret (`wanted`
    readable by the owner only) loses any group and other bits."""
    if now is None:
        return wanted
    return now & ~0o077 if wanted & 0o077 == 0 else now


def new_entry(now: Current, written: bytes) -> JsonObject:
    return {
        "original": None if now.content is None else base64.b64encode(now.content).decode(),
        "original_mode": now.mode,
        "written_sha256": sha256(written),
        "created_dirs": list(now.missing_dirs),
        "users": {},
    }


def original_of(entry: JsonObject) -> bytes | None:
    return None if entry["original"] is None else base64.b64decode(str(entry["original"]))


def json_keys(entry: JsonObject) -> list[str]:
    """The JSON keys a tool set in this file ("json_key": an undo record from before several keys)."""
    keys = entry.get("json_keys", entry.get("json_key"))
    if isinstance(keys, str):
        return [keys]
    return [str(key) for key in keys] if isinstance(keys, list) else []


def restore_dropped_keys(spec: JsonKey, entry: JsonObject, rendered: bytes) -> bytes:
    """Keys this tool set on an earlier run and no longer wants go back to how they were."""
    dropped = [key for key in json_keys(entry) if key not in spec.keys]
    if not dropped:
        return rendered
    document = load_json_object(spec.path, rendered)
    return dump_json(keys_as_before(spec.path, document, original_of(entry), dropped))


def keys_as_before(
    path: str, document: JsonObject, original: bytes | None, keys: list[str]
) -> JsonObject:
    before = load_json_object(path, original) if original is not None else {}
    for key in keys:
        if key in before:
            document[key] = before[key]
        else:
            document.pop(key, None)
    return document


def revert(path: str, entry: JsonObject, now: Current) -> FileAction:
    """Put a file back the way it was before any tool touched it, if nobody changed it since."""
    original = original_of(entry)
    if now.content == original and now.mode == entry["original_mode"]:
        return FileAction("unchanged", path)
    if now.content is None:
        return FileAction("keep", path, detail="removed since it was set up; not restored")
    if sha256(now.content) == entry["written_sha256"]:
        if original is None:
            return FileAction("remove", path, now.content)
        return FileAction("restore", path, now.content, original, int(str(entry["original_mode"])))
    if keys := json_keys(entry):
        named = ", ".join(repr(key) for key in keys)
        try:
            document = load_json_object(path, now.content)
        except SetupError:
            return FileAction("keep", path, detail=f"changed since and not valid JSON; remove {named} by hand")
        document = keys_as_before(path, document, original, keys)
        return FileAction("update", path, now.content, dump_json(document), now.mode, f"{named} as it was")
    return FileAction("keep", path, detail="changed since it was written; remove by hand if unwanted")


def in_root(root: Path, path: str) -> Path:
    return root / PurePosixPath(path).relative_to("/")


def missing_ancestors(root: Path, path: str) -> tuple[str, ...]:
    """Ancestors of `path` (outermost first) that do not exist under `root`."""
    missing = [str(parent) for parent in PurePosixPath(path).parents if not in_root(root, str(parent)).exists()]
    return tuple(reversed(missing))


def read_current(root: Path, paths: list[str]) -> dict[str, Current]:
    current = {}
    for path in paths:
        real = in_root(root, path)
        if real.is_file():
            current[path] = Current(real.read_bytes(), real.stat().st_mode & 0o7777)
        elif real.exists():
            raise SetupError(f"{real} exists and is not a file; nothing was changed")
        else:
            current[path] = Current(None, None, missing_ancestors(root, path))
    return current


def read_state(root: Path) -> JsonObject:
    real = in_root(root, STATE_PATH)
    if not real.exists():
        return empty_state()
    try:
        state = json.loads(real.read_bytes())
    except ValueError as err:
        raise SetupError(f"the undo record {real} is not valid JSON ({err}); nothing was changed") from err
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("files"), dict):
        raise SetupError(f"the undo record {real} is not one this tool wrote; nothing was changed")
    return state


def state_bytes(state: JsonObject) -> bytes:
    return (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()


def write_atomically(real: Path, content: bytes, mode: int) -> None:
    """Write a temporary file next to `real` and rename it over: readers see old or new, never half."""
    descriptor, temporary = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, real)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Printer:
    """Output lines, with secrets masked by `redact`; in a dry run, the diff of each file that would change."""

    dry_run: bool
    redact: Callable[[str], str]

    def say(self, verb: str, what: str, detail: str = "") -> None:
        line = f"{verb} {what}" + (f" ({detail})" if detail else "")
        print(self.redact(line), flush=True)

    def diff(self, action: FileAction) -> None:
        if not self.dry_run:
            return
        try:
            before = (action.before or b"").decode().splitlines(keepends=True)
            after = (action.after or b"").decode().splitlines(keepends=True)
        except UnicodeDecodeError:
            return
        for line in difflib.unified_diff(before, after, "before", "after"):
            print(self.redact("    " + line.rstrip("\n")))


def apply(plan: Plan, root: Path, printer: Printer) -> None:
    """Print every change of `plan`; unless a dry run, make it: files, directories, undo record."""
    made: set[str] = set()
    for action in plan.actions:
        real = in_root(root, action.path)
        make_dirs(action.create_dirs, root, printer, made)
        printer.say(action.verb, str(real), action.detail)
        printer.diff(action)
        if printer.dry_run:
            continue
        if action.after is not None and action.mode is not None:
            write_atomically(real, action.after, action.mode)
        elif action.verb == "remove":
            real.unlink()
    write_state(plan, root, printer, made)
    for directory in plan.remove_dirs:
        remove_if_empty(in_root(root, directory), printer)


def write_state(plan: Plan, root: Path, printer: Printer, made: set[str]) -> None:
    real = in_root(root, STATE_PATH)
    if not plan.state_changes:
        return
    if not plan.state_after["files"]:
        printer.say("remove", str(real), "undo record")
        if not printer.dry_run:
            real.unlink(missing_ok=True)
        return
    make_dirs(plan.state_dirs, root, printer, made)
    printer.say("update" if real.exists() else "create", str(real), "undo record")
    if not printer.dry_run:
        write_atomically(real, state_bytes(plan.state_after), 0o600)


def make_dirs(directories: Iterable[str], root: Path, printer: Printer, made: set[str]) -> None:
    """Create the directories not made yet in this run (`made` is updated), outermost first."""
    for directory in directories:
        if directory in made:
            continue
        made.add(directory)
        printer.say("create", f"{in_root(root, directory)}/")
        if not printer.dry_run:
            in_root(root, directory).mkdir(mode=0o755, exist_ok=True)


def remove_if_empty(real: Path, printer: Printer) -> None:
    if printer.dry_run:
        printer.say("remove", f"{real}/", "if empty")
        return
    try:
        real.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        printer.say("keep", f"{real}/", "not empty")
        return
    printer.say("remove", f"{real}/")
