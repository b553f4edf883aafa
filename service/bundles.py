"""Code bundles: a user's folder, packed as a zip, stored by the hash of its bytes.

A run whose spec names a bundle gets it as its Ray job's working directory. The store keeps each
bundle under its SHA-256 (``<root>/<hash>.zip``), written once and never changed, so a run that
is dispatched again (after a restart of the control plane, or a retry) gets exactly the same code,
and the hash recorded with the run says which code that was.

What a bundle may hold is checked before it is stored (:func:`check_bundle`): a readable zip, its
packed and unpacked sizes within the limit, no entry that escapes the folder (an absolute path,
``..``, a symbolic link whose target leads outside), and no top-level package named like one of
Orchestra's own, which the job imports from the working directory's neighbour on ``sys.path``.
:func:`pack` builds a bundle from a folder the way the CLI and the Python client do, leaving out
what the folder's ``.gitignore`` files ignore.
"""

import hashlib
import io
import os
import posixpath
import re
import stat
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

RESERVED = frozenset({"api", "service", "workers", "algorithms", "migrations"})  # Orchestra's top-level packages
HASH = re.compile(r"[0-9a-f]{64}")
_ALWAYS_LEFT_OUT = (".git/", "__pycache__/", "*.pyc", ".venv/")


class BundleError(ValueError):
    """A bundle that cannot be stored: ``field`` names the entry (or ``body``), 413 for size."""

    def __init__(self, message: str, *, entry: str = "body", status_code: int = 422) -> None:
        super().__init__(message)
        self.entry, self.status_code = entry, status_code


@dataclass(frozen=True)
class BundleInfo:
    hash: str
    size: int  # bytes of the zip
    files: int


def check_bundle(data: bytes, max_bytes: int) -> BundleInfo:
    """Raise :class:`BundleError` unless ``data`` is a zip this store accepts."""
    if len(data) > max_bytes:
        raise BundleError(f"the bundle is {len(data)} bytes, over the limit of {max_bytes}", status_code=413)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        raise BundleError(f"not a zip archive: {exc}") from None
    unpacked = 0
    for info in entries:
        name = info.filename
        _check_path(name)
        unpacked += info.file_size
        if unpacked > max_bytes:
            raise BundleError(f"the bundle unpacks to more than the limit of {max_bytes} bytes", entry=name,
                              status_code=413)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            target = archive.read(info).decode("utf-8", "replace")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            if target.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise BundleError(f"symbolic link to {target!r} points outside the folder", entry=name)
    clash = sorted(_top_level_packages(e.filename for e in entries) & RESERVED)
    if clash:
        raise BundleError(f"a top-level package named {clash[0]!r} would shadow Orchestra's own "
                          f"({', '.join(sorted(RESERVED))}): rename it or move it into a package of yours",
                          entry=clash[0])
    return BundleInfo(hash=hashlib.sha256(data).hexdigest(), size=len(data), files=len(entries))


def _check_path(name: str) -> None:
    if not name or "\x00" in name or "\\" in name:
        raise BundleError("an entry with an empty name, a NUL or a backslash", entry=name[:200] or "body")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BundleError("an absolute path escapes the folder", entry=name[:200])
    if ".." in name.split("/"):
        raise BundleError("a '..' component escapes the folder", entry=name[:200])


def _top_level_packages(names: Iterable[str]) -> set[str]:
    """Top-level importable names: ``pkg/...`` folders and ``module.py`` files at the root."""
    out = set()
    for name in names:
        head, sep, _ = name.partition("/")
        if sep:
            out.add(head)
        elif head.endswith(".py"):
            out.add(head[:-3])
    return out


class BundleStore:
    """Bundles on a filesystem folder (the home of the embedded stack, or a folder every API
    replica shares)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes

    def path(self, digest: str) -> Path:
        if not HASH.fullmatch(digest):
            raise BundleError(f"not a bundle hash: {digest[:80]!r}", entry="code.bundle")
        return self.root / f"{digest}.zip"

    def exists(self, digest: str) -> bool:
        return HASH.fullmatch(digest) is not None and self.path(digest).is_file()

    def put(self, data: bytes) -> BundleInfo:
        """Check and store; storing the same bytes again changes nothing."""
        info = check_bundle(data, self.max_bytes)
        target = self.path(info.hash)
        if not target.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)  # atomic: a reader never sees half a bundle
        return info


def pack(folder: Path) -> bytes:
    """A zip of ``folder``'s files, without what its ``.gitignore`` files (and Python's caches,
    ``.git`` and ``.venv``) leave out; symbolic links are kept as links."""
    import pathspec

    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise BundleError(f"not a folder: {folder}", entry="code")
    always = pathspec.PathSpec.from_lines("gitwildmatch", _ALWAYS_LEFT_OUT)
    ignores: list[tuple[str, pathspec.PathSpec]] = []  # (folder prefix, its .gitignore)

    def ignored(rel: str, is_dir: bool) -> bool:
        probe = rel + ("/" if is_dir else "")
        return always.match_file(probe) or any(
            probe.startswith(base) and spec.match_file(probe[len(base):]) for base, spec in ignores)

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for current, dirs, files in os.walk(folder, followlinks=False):
            here = Path(current)
            rel_dir = here.relative_to(folder).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            if (here / ".gitignore").is_file():
                lines = (here / ".gitignore").read_text().splitlines()
                ignores.append((rel_dir, pathspec.PathSpec.from_lines("gitwildmatch", lines)))
            links = [d for d in dirs if (here / d).is_symlink()]  # kept as links, not followed
            dirs[:] = sorted(d for d in dirs if d not in links and not ignored(rel_dir + d, True))
            for name in sorted(files + links):
                full, rel = here / name, rel_dir + name
                if ignored(rel, name in links):
                    continue
                if full.is_symlink():
                    link = zipfile.ZipInfo(rel)
                    link.external_attr = (stat.S_IFLNK | 0o777) << 16
                    archive.writestr(link, os.readlink(full))
                else:
                    archive.write(full, rel)
    return buffer.getvalue()
