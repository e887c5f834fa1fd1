"""Append-only JSONL sinks shared by every worker on every host, and the legacy label files.

Two ways to write a sink:

* **Parts** (``parts=True``, the step sinks): each writer process appends to a part file of its
  own, ``<stem>.parts/<n>.jsonl`` next to the main file, with no lock between processes or
  hosts (a thread lock orders the threads of one process). Part numbers are allocated with
  ``O_EXCL`` above every number in use or ever merged, so they only grow; a writer takes a new
  part per process and per run (``writer``) and whenever its part was merged by a finalize.
  ``producer finalize`` merges the parts into the main file (one line per image) and removes them.
* **One locked file** (``parts=False``: the failures file, rare writes): one ``write`` under a
  ``flock`` on the file (which Linux maps to NFS byte-range locks on a shared volume), as before.
  Byte-range locks are owned per *process*, so the kernel may report a false deadlock (EDEADLK)
  between two multi-threaded workers each holding one sink; we retry.

Either way each line is fsynced and read back before ``append`` returns. ``append`` returns an
int that ``read_at`` takes back: ``part << PART_SHIFT | byte offset``. The main file counts as
the part number it was last merged under (0 until the first merge, so offsets from before parts
existed stay valid); an offset into a part that was merged since, or into an older main file,
raises ``StaleOffset`` instead of reading another record. Readers see the main file, then the
parts by number: that is the order "the last record per ``image_id`` wins" follows.

A crash can only leave a torn *last* line; the next writer of that file seals it with a newline
so it stays an isolated bad line, and readers skip bad lines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = str(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


def _lock(fd: int) -> None:
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        except OSError as exc:
            if exc.errno != errno.EDEADLK:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a write may be short (a disk that fills up
    mid-line writes what fits and reports the count; only the next write raises ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]


def _cut(fd: int, end: int) -> None:
    """Take a partly written line off the end again (we still hold the lock). If even that
    fails (a volume gone read-only), the torn tail stays; the next writer seals it and readers
    skip it, and nothing was indexed to point at it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, end)


def dumps(record: dict) -> str:
    """The one JSON encoding every output file uses (stable key order, UTF-8, no spaces wasted)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@dataclass
class ReadStats:
    """What a full read of a sink saw, so torn or corrupt lines are counted, not hidden."""

    lines: int = 0
    bad_lines: int = 0


PART_SHIFT = 40  # bytes per part file: up to 1 TiB; part numbers: up to 2**23
_OFFSET_MASK = (1 << PART_SHIFT) - 1
_MERGED_FILE = "merged"  # in the parts folder: the highest part number ever merged (never reused)
_MAIN_GEN_FILE = "main"  # in the parts folder: the part number the main file's offsets carry


class StaleOffset(FileNotFoundError):
    """An offset into a part a finalize has merged since, or into an older main file: the
    record is still in the sink, at another offset (``latest_offsets`` finds it)."""


def encode_offset(part: int, offset: int) -> int:
    if offset > _OFFSET_MASK:
        raise OSError(errno.EFBIG, f"part file over {_OFFSET_MASK} bytes")
    return part << PART_SHIFT | offset


def decode_offset(value: int) -> tuple[int, int]:
    """``(part, byte offset)`` of an int ``append`` returned."""
    return value >> PART_SHIFT, value & _OFFSET_MASK


@dataclass
class _Part:
    """The part one writer process appends to."""

    pid: int
    writer: str
    number: int
    path: Path


_PARTS: dict[tuple[str, str], _Part] = {}  # (sink path, writer) -> this process's part


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _lines(path: Path) -> Iterator[bytes]:
    """The lines of a file; none if it is gone (a part merged by a finalize since it was
    listed: its lines are in the main file)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below; only the open may miss
    except FileNotFoundError:
        return
    with f:
        yield from f


_DECODE = json.JSONDecoder().decode  # on str: json.loads(bytes) first guesses the encoding, per line


def loads(line: bytes) -> Any:
    """One JSON document of a sink line. orjson first: parsing every line is most of what
    finalize and reindex spend (about twice as fast as ``json`` on our records). What orjson
    refuses and ``json`` takes (NaN, escaped lone surrogates) falls back to ``json``, so those
    lines read as they always have; ``ValueError`` when neither takes it. One difference is
    left: orjson reads an integer past 64 bits as a float (no record we write holds one)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return _DECODE(line.decode("utf-8"))


def loads_marked(line: bytes) -> tuple[Any, bool]:
    """``loads``, and whether orjson read the line: only what orjson read may be written back
    by ``dumps_line``'s fast path (what ``json`` alone takes, such as NaN, orjson would write
    differently)."""
    try:
        return orjson.loads(line), True
    except orjson.JSONDecodeError:
        return _DECODE(line.decode("utf-8")), False


def _risky_number(out: bytes) -> bool:
    """Whether orjson's bytes may hold a number ``json`` (which uses ``repr``) writes otherwise:
    one with an exponent (orjson writes ``e+``/``e-`` after a digit) or a fraction under 1e-4
    (``repr`` writes ``8.87e-05``, orjson ``0.0000887``). Plain substring searches: a regex
    costs more than the orjson encoding it guards. The same text inside a string only costs
    the slow path."""
    if b"0.0000" in out:
        return True
    for sign in (b"e+", b"e-"):
        i = out.find(sign)
        while i > 0:
            if 48 <= out[i - 1] <= 57:  # a digit before the "e"
                return True
            i = out.find(sign, i + 2)
    return False


def dumps_line(record: Any, orjson_read: bool) -> bytes:
    """``(dumps(record) + "\n")`` as UTF-8, byte for byte, about twenty times faster for a
    record built from what orjson read (``loads_marked``): finalize writes one per image.

    orjson and ``json`` (``ensure_ascii=False``, compact) agree on strings, integers, booleans,
    null, key order and every float that has neither an exponent nor four zeros after the point
    (checked over every code point and millions of floats); a record whose orjson bytes hold
    such a number, or that orjson refuses (an integer past 64 bits, deep nesting), goes
    through ``dumps``."""
    if orjson_read:
        try:
            out = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            pass
        else:
            if not _risky_number(out):
                return out
    return (dumps(record) + "\n").encode("utf-8")


def _parse(line: bytes) -> dict | None:
    """The record of a whole line, or None for a torn, corrupt or foreign one."""
    if not line.endswith(b"\n"):
        return None
    try:
        record = loads(line)
    except ValueError:  # UnicodeDecodeError is one too
        return None
    return record if isinstance(record, dict) and "image_id" in record else None


class JsonlSink:
    """One append-only JSONL log of records keyed by ``image_id``: a main file, plus the part
    files of its writers when ``parts`` (see the module docstring)."""

    def __init__(self, path: str | Path, *, fsync: bool = True, parts: bool = False, writer: str = ""):
        self.path = Path(path)
        self.fsync = fsync
        self.parts = parts
        self.writer = writer

    # -- where the parts are -----------------------------------------------------------------
    @property
    def parts_dir(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.parts")

    def part_path(self, number: int) -> Path:
        return self.parts_dir / f"{number:06d}.jsonl"

    def _main_info(self) -> dict:
        """What the last finalize recorded for the main file, resolved against the file there
        now: ``gen`` and ``carried`` if the merged file is in place, else the ones before."""
        try:
            info = json.loads((self.parts_dir / _MAIN_GEN_FILE).read_bytes())
            ino = os.stat(self.path).st_ino
        except (OSError, ValueError):
            return {"gen": 0, "carried": {}}
        if info.get("ino") == ino:
            return {"gen": int(info["gen"]), "carried": info.get("carried") or {}}
        return {"gen": int(info.get("prev", 0)), "carried": info.get("prev_carried") or {}}

    def carried_usage(self) -> dict:
        """Token usage of the lines finalizes merged away (superseded records were calls paid
        for): ``producer.usage`` adds it to what the lines left show."""
        return self._main_info()["carried"]

    def main_generation(self) -> int:
        """The part number offsets into the main file carry (0 until a finalize merged parts).

        A finalize records ``{"gen", "ino", "prev"}`` *before* it renames the merged file over
        the main one: the main file is generation ``gen`` only once it is that inode, so a
        finalize killed at any point leaves a consistent sink (the old main, its parts still
        read after it; or the new main, the merged parts ignored)."""
        return self._main_info()["gen"]

    def part_files(self) -> list[tuple[int, Path]]:
        """``(number, path)`` of every part not yet merged into the main file, by number (a part
        a finalize is merging, ``.merging``, counts until the main file holds its lines)."""
        try:
            names = os.listdir(self.parts_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        merged_below = None
        out = []
        for name in names:
            head, _, tail = name.partition(".")
            if not head.isdigit() or tail not in ("jsonl", "jsonl.merging"):
                continue
            if tail == "jsonl.merging":
                if merged_below is None:
                    merged_below = self.main_generation()
                if int(head) < merged_below:
                    continue  # merged: a finalize was stopped before it removed it
            out.append((int(head), self.parts_dir / name))
        return sorted(out)

    def exists(self) -> bool:
        return self.path.exists() or bool(self.part_files())

    # -- writing -------------------------------------------------------------------------------
    def append(self, record: dict) -> int:
        """Append one record as one whole line; return where it is (for ``read_at``).

        The line is on disk (written in full, fsynced, read back) when this returns. Anything
        short of that raises ``OSError`` and leaves the file as it was: a short write (a full
        disk, a quota) or a failed fsync is cut off again, so no torn line is ever left behind
        for a reader, and the caller (``worker.execute.commit``) retries the write later. Only a
        crash between the write and the cut can leave a torn tail, which the next writer seals.
        """
        line = (dumps(record) + "\n").encode("utf-8")
        if self.parts:
            return self._append_part(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _lock(fd)
                try:
                    return self._write_line(fd, line, self.path)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _write_line(self, fd: int, line: bytes, path: Path) -> int:
        """Write ``line`` at the end of ``fd`` (which no one else writes now); its start offset."""
        end = os.lseek(fd, 0, os.SEEK_END)
        if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
            _write_all(fd, b"\n")  # seal a torn line a crashed writer left behind
            end += 1
        try:
            _write_all(fd, line)
            if self.fsync:
                os.fsync(fd)
            if os.pread(fd, len(line), end) != line:
                raise OSError(errno.EIO, f"{path}: the line written at byte {end} reads back different")
        except OSError:
            _cut(fd, end)
            raise
        return end

    def _append_part(self, line: bytes) -> int:
        with _thread_lock(self.path):
            for _ in range(3):
                part = self._my_part()
                try:
                    # Opened per append, as the locked file is: an idle worker holds no file open
                    # for writing (a volume can be remounted or unmounted under it).
                    fd = os.open(part.path, os.O_RDWR | os.O_APPEND)
                except FileNotFoundError:
                    self._drop_part(part)  # a finalize merged it: take a new part
                    continue
                try:
                    end = self._write_line(fd, line, part.path)
                    named = self._still_named(part.path, fd)
                finally:
                    os.close(fd)
                if named:
                    return encode_offset(part.number, end)
                # A finalize renamed the part to merge it while we wrote: it may have read the
                # file before our line. Write the line again in a new part (a duplicate of one
                # record is harmless: both are the same record, the later one wins).
                self._drop_part(part)
            raise OSError(errno.EAGAIN, f"{self.parts_dir}: parts merged under the writer three times in a row")

    @staticmethod
    def _still_named(path: Path, fd: int) -> bool:
        try:
            return os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _drop_part(self, part: _Part) -> None:
        key = (str(self.path), self.writer)
        if _PARTS.get(key) is part:
            del _PARTS[key]

    def _my_part(self) -> _Part:
        """This process's part for this run, allocated on first use (and after a merge). Tasks
        of two spec versions in flight together keep a part each, instead of a new part per
        switch; the later version's part has the higher number."""
        key = (str(self.path), self.writer)
        part = _PARTS.get(key)
        if part is not None and part.pid != os.getpid():
            del _PARTS[key]  # a forked child: never share its parent's part
            part = None
        if part is None:
            part = _PARTS[key] = self._allocate()
        return part

    def _allocate(self) -> _Part:
        # The main file exists as soon as a step has output, so "is there a sink?" stays a
        # look at one path (and a path that cannot be a file fails here, before any part).
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
        self.parts_dir.mkdir(exist_ok=True)
        taken = [n for n, _ in self.part_files()]
        number = max([_read_int(self.parts_dir / _MERGED_FILE), *taken]) + 1
        while True:
            path = self.part_path(number)
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                number += 1
                continue
            return _Part(os.getpid(), self.writer, number, path)

    # -- merging (producer finalize, holding the finalize lock) ------------------------------
    def freeze(self, keep: int | None = None) -> list[int]:
        """Mark every part for merging (``<n>.jsonl`` -> ``<n>.jsonl.merging``): its writer, on
        its next append, finds its part gone and takes a new one (``_still_named``), so nothing
        written after this is lost in the merge. Returns the numbers marked.

        Call ``reserve_generation`` first and pass it as ``keep`` (its empty placeholder stays):
        every part frozen is then below the merged generation and every part a writer opens
        after the freeze above it, so "below the generation" means exactly "merged"."""
        frozen = []
        for number, path in self.part_files():
            if path.suffix == ".jsonl" and number != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, path.with_name(path.name + ".merging"))
                    frozen.append(number)
        return frozen

    def reserve_generation(self) -> int:
        """A part number above every one used so far, for the merged main file: its placeholder
        part is created (``O_EXCL``) and the merged mark raised, so no writer takes it."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        merged_mark = self.parts_dir / _MERGED_FILE
        number = max([_read_int(merged_mark), self.main_generation(), *(n for n, _ in self.part_files())]) + 1
        while True:
            try:
                os.close(os.open(self.part_path(number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                break
            except FileExistsError:
                number += 1
        write_atomic(merged_mark, f"{number}\n")
        return number

    def replace_main(self, merged: Path, generation: int, dropped_usage: dict | None = None) -> None:
        """Make ``merged`` (a complete, fsynced file in the same folder) the main file, as
        generation ``generation``, and remove the parts it holds. ``dropped_usage``: the usage
        counts of the lines the merge left out, added to what earlier merges carried. See
        ``main_generation`` for why this is recorded before the rename."""
        before = self._main_info()
        carried = dict(before["carried"])
        for f, v in (dropped_usage or {}).items():
            carried[f] = carried.get(f, 0) + v
        info = {"gen": generation, "ino": os.stat(merged).st_ino, "carried": carried,
                "prev": before["gen"], "prev_carried": before["carried"]}
        write_atomic(self.parts_dir / _MAIN_GEN_FILE, dumps(info) + "\n")
        os.replace(merged, self.path)
        for name in os.listdir(self.parts_dir):
            head, _, tail = name.partition(".")
            if tail == "jsonl.merging" and head.isdigit() and int(head) < generation:
                (self.parts_dir / name).unlink(missing_ok=True)
        self.part_path(generation).unlink(missing_ok=True)

    def reader(self) -> SinkReader:
        """Random reads of many records (one open file per part, not one open per record)."""
        return SinkReader(self)

    # -- reading -------------------------------------------------------------------------------
    def _file_of(self, part: int) -> Path:
        if part == self.main_generation():
            return self.path
        path = self.part_path(part)
        for candidate in (path, path.with_name(path.name + ".merging")):
            if candidate.exists():
                return candidate
        raise StaleOffset(errno.ENOENT, f"{self.path}: part {part} was merged into the main file; "
                                        "the offset is stale (reindex from the sink)")

    def read_line_at(self, offset: int) -> bytes:
        """The raw line (with its newline) that starts at ``offset``."""
        part, pos = decode_offset(offset)
        path = self._file_of(part)
        with open(path, "rb") as f:
            f.seek(pos)
            line = f.readline()
        if not line.endswith(b"\n"):
            raise ValueError(f"{path}: no complete record at byte {pos}")
        return line

    def read_at(self, offset: int) -> dict:
        """The record whose line starts at ``offset`` (as returned by ``append``)."""
        return loads(self.read_line_at(offset))

    def find_latest(self, image_id: str) -> tuple[int, dict] | None:
        """``(offset, record)`` of the newest record of ``image_id``, or None if the sink has
        none: what a holder of a ``StaleOffset`` reads instead (the record moved in a merge).

        A merged main file (generation > 0) holds one line per image sorted by image id, so it
        is binary-searched by seeking; the parts after it are small and scanned. A main file
        from before any merge is scanned. A finalize may replace the main file between the
        look-ups (then the record is in the new one): the search is tried again a few times."""
        image_id = str(image_id)
        for _ in range(3):
            try:
                gen = self.main_generation()
                found = None
                if self.path.exists():
                    found = (self._search_main(gen, image_id) if gen
                             else self._scan_file(gen, self.path, image_id))
                for number, path in self.part_files():
                    found = self._scan_file(number, path, image_id) or found
                if found is None or self.main_generation() == gen:
                    return found
            except StaleOffset:
                pass
        return found

    @staticmethod
    def _scan_file(part: int, path: Path, image_id: str) -> tuple[int, dict] | None:
        found, offset = None, 0
        for line in _lines(path):
            start, offset = offset, offset + len(line)
            record = _parse(line)
            if record is not None and str(record["image_id"]) == image_id:
                found = encode_offset(part, start), record
        return found

    def _search_main(self, gen: int, image_id: str) -> tuple[int, dict] | None:
        """Binary search of the merged main file (sorted by ``str(image_id)``, one line each)."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            return None
        with f:
            size = os.fstat(f.fileno()).st_size

            def line_from(pos: int) -> tuple[int, bytes]:
                """The first line that starts at or after ``pos``."""
                if pos > 0:
                    f.seek(pos - 1)
                    f.readline()  # the rest of the line ``pos - 1`` is in
                else:
                    f.seek(0)
                start = f.tell()
                return start, f.readline()

            def key(line: bytes) -> str | None:
                record = _parse(line)
                return None if record is None else str(record["image_id"])

            lo, hi = 0, size
            while lo < hi:  # the smallest pos whose next line's id is >= image_id
                mid = (lo + hi) // 2
                start, line = line_from(mid)
                k = key(line) if start < size else None
                if start < size and k is None:  # a line the merge did not write: do not guess
                    return self._scan_file(gen, self.path, image_id)
                if start >= size or k >= image_id:
                    hi = mid
                else:
                    lo = mid + 1
            start, line = line_from(lo)
            record = _parse(line)
            if record is not None and str(record["image_id"]) == image_id:
                return encode_offset(gen, start), record
            return None

    def files(self) -> list[tuple[int, Path]]:
        """``(part number, path)`` of the main file and every part, in reading order."""
        out = [(self.main_generation(), self.path)] if self.path.exists() else []
        return out + self.part_files()

    def scan(self, stats: ReadStats | None = None) -> Iterator[tuple[int, dict]]:
        """Every valid record with its offset: the main file, then the parts by number, each in
        file order (so the last record per image_id is the newest); bad or torn lines are skipped."""
        for part, path in self.files():
            offset = 0
            for line in _lines(path):
                start, offset = offset, offset + len(line)
                if stats is not None:
                    stats.lines += 1
                record = _parse(line)
                if record is None:
                    if stats is not None:
                        stats.bad_lines += 1
                    continue
                yield encode_offset(part, start), record

    def latest_offsets(self, stats: ReadStats | None = None) -> dict[str, int]:
        """``image_id -> offset`` of the last valid record per image (last wins). Holds every
        image: large sinks use ``producer.extsort.latest_sorted`` instead."""
        return {rec["image_id"]: off for off, rec in self.scan(stats)}

    def latest(self) -> dict[str, dict]:
        """``image_id -> record``, last wins. For small sinks and tests; large runs use offsets."""
        return {rec["image_id"]: rec for _, rec in self.scan()}


class SinkReader:
    """``read_line_at`` over a sink's files kept open; use as a context manager.

    Each read is one ``pread`` at the offset (a buffered file would refill its whole buffer
    after every seek): finalize reads a line per image per step this way."""

    _GUESS = 4096  # bytes read first: most lines fit, a longer one takes more reads

    def __init__(self, sink: JsonlSink):
        self.sink = sink
        self._files: dict[int, int] = {}

    def read_line_at(self, offset: int) -> bytes:
        part, pos = decode_offset(offset)
        fd = self._files.get(part)
        if fd is None:
            fd = self._files[part] = os.open(self.sink._file_of(part), os.O_RDONLY)
        chunk = os.pread(fd, self._GUESS, pos)
        end = chunk.find(b"\n")
        if end >= 0:
            return chunk[:end + 1]
        chunks = [chunk]
        size = self._GUESS
        while len(chunk) == size:  # not at the end of the file yet: the line goes on
            pos += size
            size *= 2
            chunk = os.pread(fd, size, pos)
            end = chunk.find(b"\n")
            if end >= 0:
                chunks.append(chunk[:end + 1])
                return b"".join(chunks)
            chunks.append(chunk)
        raise ValueError(f"{self.sink.path}: no complete record at part {part} byte {decode_offset(offset)[1]}")

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __enter__(self) -> SinkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def temp_path(path: Path) -> Path:
    """A temp file next to ``path`` that no other writer names the same: host, pid and thread
    (identical containers on two hosts sharing the volume can have the same pid)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so readers see the old or the new one, never half of it.

    The temporary file is removed again when the write fails (a full or read-only disk), so a
    failure leaves nothing behind; the caller decides whether to try again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
