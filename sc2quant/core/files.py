"""Small file helpers every layer uses: JSON that must be valid, checksums, sizes, safetensors headers."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from sc2quant.core.errors import UserError

MAX_JSON_BYTES = 64 * 2**20  # configs, manifests and genai configs are kilobytes; an index of a huge model < 10 MB
MAX_SAFETENSORS_HEADER = 100_000_000  # the limit safetensors itself enforces


def check_regular(file: Path, what: str = "file") -> None:
    """Refuse what is not a regular file (a FIFO would block the reader forever, a device never ends)
    before anything opens it. A missing file is left to the caller (FileNotFoundError)."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UserError(f"cannot read {file} ({exc.strerror}): make it readable, or pass another path") from exc
    if not stat.S_ISREG(mode):
        raise UserError(f"{file} is not a regular {what} (a FIFO, device or directory): replace it with the real file")


def read_json(file: Path, fix: str, error: type[UserError] = UserError) -> Any:
    """Parse a JSON file or raise `error` naming the file and `fix` (what the user should do).
    A file that is not a regular file, unreadable, absurdly large or nested too deeply is refused too."""
    try:
        check_regular(Path(file))
        if Path(file).stat().st_size > MAX_JSON_BYTES:
            raise error(f"{file} is {Path(file).stat().st_size:,} bytes, far more than a JSON file of a model holds: {fix}")
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{file} is missing: {fix}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file} is not valid JSON ({exc}): {fix}") from exc
    except RecursionError:
        raise error(f"{file} is nested too deeply to be a model's JSON file: {fix}") from None
    except OSError as exc:  # permission denied, a directory, an I/O error
        raise error(f"cannot read {file} ({exc.strerror}): make it readable, or {fix}") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    check_regular(Path(path))
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_base() -> Path:
    """The user cache: $SC2QUANT_CACHE, else $XDG_CACHE_HOME/sc2quant, else ~/.cache/sc2quant (a user
    with no home: a folder of this user's under the system's temporary directory)."""
    if os.environ.get("SC2QUANT_CACHE"):
        return Path(os.environ["SC2QUANT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sc2quant"
    try:
        return Path.home() / ".cache" / "sc2quant"
    except RuntimeError:  # no $HOME and no passwd entry (a container's arbitrary uid)
        import tempfile

        return Path(tempfile.gettempdir()) / f"sc2quant-{os.getuid()}"


def file_identity(path: Path) -> list[int]:
    """What changes whenever a file's content may have: device, inode, size, modification and change
    time (any write moves the change time, which no user can set back)."""
    info = os.stat(path)
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


SETTLED_NS = 2_000_000_000  # a file changed this recently may change again within its timestamps' granularity


def known_sha256(path: Path) -> str:
    """sha256 of `path`, taken from the record of an earlier hash when the file is provably the same file,
    unchanged since (`file_identity`). Otherwise hashed, and recorded in the user cache (`verified/`,
    trusted only while that folder and the cache root are this user's and writable by no one else:
    whoever can write the root can put another folder in its place; both made 0700) once the file has
    been still for two seconds (a write within the timestamps' granularity would go unseen).
    Loading a 4.6 GB artifact otherwise hashes it on every load. What the identity cannot see: writes
    through a memory map whose pages were already written move no time; SC2QUANT_VERIFY=full hashes
    every file at every load."""
    import time

    if os.environ.get("SC2QUANT_VERIFY", "").strip().lower() == "full":
        return sha256_file(path)
    ident = file_identity(path)
    now = time.time_ns()
    folder = cache_base() / "verified"
    record = folder / (hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        if _private(folder) and _private(folder.parent):
            known = json.loads(_read_private(record))
            if known["stat"] == ident and isinstance(known["sha256"], str):
                return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    if now - max(ident[3], ident[4]) > SETTLED_NS:
        part = record.with_name(f".{record.name}.{os.getpid()}")
        try:
            folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)  # whatever the umask
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps({"stat": ident, "sha256": digest, "path": str(path)}))
            part.replace(record)
        except OSError:  # a read-only cache: hashed again next time
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
    return digest


def _read_private(file: Path) -> str:
    """The text of a record file that is this user's and that no one else can write (a link, another
    user's file or one others can write is refused: OSError), read from the file checked."""
    fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise PermissionError(f"{file} is not a private file of this user")
        return fh.read()


def _private(folder: Path) -> bool:
    """Whether `folder` is a directory of this user that no one else can write to."""
    info = os.stat(folder)
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def dir_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, tensor entries) of a safetensors file, read without loading tensors.
    A header that cannot be one (longer than the file or safetensors' limit, not a JSON mapping of
    entries with a dtype, a shape and offsets) is a `UserError` naming the file."""
    file = Path(file)
    check_regular(file, "weight file")
    size = file.stat().st_size
    bad = f"corrupt weight file {file.name}"
    with open(file, "rb") as fh:
        first = fh.read(8)
        if len(first) < 8:
            raise UserError(f"{bad} ({size} bytes, no safetensors header): re-download or re-export the model")
        (header_len,) = struct.unpack("<Q", first)
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise UserError(f"{bad} (its header claims {header_len:,} bytes of a {size:,}-byte file): "
                            "re-download or re-export the model")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError):
            raise UserError(f"{bad} (its header is not valid JSON): re-download or re-export the model") from None
    if not isinstance(header, dict):
        raise UserError(f"{bad} (its header is not a mapping of tensors): re-download or re-export the model")
    header.pop("__metadata__", None)
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise UserError(f"{bad} (tensor {str(name)[:80]} has no valid dtype, shape and offsets): "
                            "re-download or re-export the model")
    return header_len, header
