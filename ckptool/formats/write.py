"""Writing checkpoints: atomic outputs, streamed safetensors, read-back verification.

Every output goes to a temp file in the target directory, is fsynced, verified, given
normal permissions and renamed into place; on any failure the temp file is removed,
so a reader sees the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from ckptool.errors import CkptError, OutputError, VerificationError, option
from ckptool.formats.meta import CheckpointMeta, TensorMeta
from ckptool.formats.safetensors_header import SAFETENSORS_DTYPES, header_shape

# torch dtype name -> safetensors code.
SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
# Bounded buffer for copies that cannot stay in the kernel, and for verification reads.
CHUNK = 4 * 1024 * 1024
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass(frozen=True)
class ByteSource:
    """Bytes to copy unchanged from a file."""

    file: str
    offset: int
    length: int


class ComputedBytes:
    """Bytes made only when they are written (a merged or cast tensor), so a plan of
    many holds none of them: one tensor's bytes are in memory at a time."""

    def __init__(self, length: int, produce: Callable[[], bytes | bytearray | memoryview]) -> None:
        self.length = length
        self._produce = produce

    def materialize(self) -> bytes | bytearray | memoryview:
        data = self._produce()
        if len(data) != self.length:
            raise OutputError(f"a computed tensor has {len(data)} bytes, {self.length} planned")
        return data


TensorData = ByteSource | bytes | ComputedBytes


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its name, dtype, shape and where its bytes come from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: TensorData
    tie: object = None  # tensors with equal non-None ties are one tensor (tied weights)

    @property
    def identity(self) -> object:
        """Equal identities mean the same bytes: stored once, loaded as tied."""
        if self.tie is not None:
            return self.tie
        return self.data if isinstance(self.data, ByteSource) else None

    @property
    def nbytes(self) -> int:
        return data_length(self.data)


# --- output paths --------------------------------------------------------------------


def check_output(out: str, *, inputs: Sequence[str], force: bool) -> None:
    """Refuse an output that would lose data.

    Raises:
        OutputError: ``out`` exists and ``force`` is false; ``out`` is one of the
            inputs (even with ``force``); its directory is missing; it is a directory.
    """
    for source in inputs:
        if _same_file(out, source):
            raise OutputError(f"{out}: is the same file as the input {source}; write elsewhere")
    if os.path.isdir(out):
        raise OutputError(f"{out}: is a directory; name an output file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: directory {parent} does not exist")
    if os.path.exists(out) and not force:
        raise OutputError(f"{out}: exists; add {option('force', True)} to replace it")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class TempOutput:
    """The open temp file and its path, so it can be read back before it is committed."""

    file: BinaryIO
    path: str


# Outputs renamed into place by this process, newest last: an interrupt that lands after
# a commit must not claim that nothing was written.
_committed: list[str] = []


def committed_outputs() -> tuple[str, ...]:
    """Outputs this process has committed (renamed into place), oldest first."""
    return tuple(_committed)


def forget_committed(path: str) -> None:
    """A committed file was removed again (a shard of an abandoned sharded write)."""
    with contextlib.suppress(ValueError):
        _committed.remove(path)


@contextlib.contextmanager
def atomic_output(out: str, *, replace: bool = True) -> Iterator[TempOutput]:
    """Yield a temp file beside ``out``; on success fsync, chmod, rename it into place.

    With ``replace`` false the final name is created exclusively (a hard link), so of two
    writers racing for a new output one fails instead of both "succeeding".

    Raises:
        OutputError: no space, no permission, ``out`` appeared meanwhile (without
            ``replace``), or another OS error while writing.
    """
    parent = os.path.dirname(os.path.abspath(out))
    _remove_stale_temps(parent, os.path.basename(out))
    try:
        fd, temp = tempfile.mkstemp(dir=parent, prefix=_temp_prefix(out), suffix=".tmp")
    except OSError as e:
        raise output_error(out, e) from e
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield TempOutput(handle, temp)
            handle.flush()
            os.fsync(handle.fileno())
            # mkstemp creates 0600; outputs get the usual 0666 minus umask, like cp.
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
        with _interrupts_deferred():
            _commit(temp, out, replace=replace)
            _committed.append(out)
        _fsync_directory(parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        if isinstance(e, OSError) and not isinstance(e, CkptError):
            raise output_error(out, e) from e
        raise


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a file is renamed into place and recorded as committed,
    so an interrupt never lands between the two (it is delivered right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _temp_prefix(out: str) -> str:
    # The pid lets a later run tell a dead run's leftovers from a live writer's temp file.
    return f".{os.path.basename(out)}.{os.getpid()}."


def _remove_stale_temps(parent: str, basename: str) -> None:
    """Remove temp files that killed runs (kill -9, power loss) left for this output."""
    prefix = f".{basename}."
    try:
        entries = [e for e in os.listdir(parent) if e.startswith(prefix) and e.endswith(".tmp")]
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(parent, entry))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _commit(temp: str, out: str, *, replace: bool) -> None:
    if replace:
        os.replace(temp, out)
        return
    try:
        os.link(temp, out)
    except FileExistsError as e:
        raise OutputError(
            f"{out}: appeared while this run was writing it (another writer?); left as it "
            f"is, nothing was written; add {option('force', True)} to replace it"
        ) from e
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links here (some network and FAT filesystems): check, then rename.
        if os.path.lexists(out):
            raise OutputError(f"{out}: exists; add {option('force', True)} to replace it") from e
        os.replace(temp, out)
        return
    os.unlink(temp)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def output_error(out: str, e: OSError) -> OutputError:
    """The one line for an OSError met writing ``out`` (nothing of it is left)."""
    if e.errno in _NO_SPACE:
        return OutputError(f"{out}: no space left on the device; nothing was written")
    if e.errno in _NO_PERMISSION:
        return OutputError(f"{out}: no permission to write here; nothing was written")
    return OutputError(f"{out}: cannot write ({e.strerror or e}); nothing was written")


# --- payload: every tensor's bytes, one pass over each source file -------------------

# Metadata key of the source file's sha256 (provenance); computed during the copy.
SOURCE_SHA256 = "ckptool.source_sha256"
# Ranges of one source file less than this apart are read as one stretch.
_GAP = 1024 * 1024


@dataclass
class _Stretch:
    """One source range being copied: where it goes and its running CRC-32."""

    source: ByteSource
    positions: list[tuple[int, int]]  # (output fd, offset there)
    crc: int = 0

    @property
    def end(self) -> int:
        return self.source.offset + self.source.length


class Payload:
    """The tensor bytes of one or more output files (the shards of one checkpoint),
    placed at their offsets, then copied.

    Each source file is read once, in file order, in bounded chunks. Every piece of a
    chunk is written where the plan placed it, read straight back from the output and
    compared with the chunk still in memory; the file that identifies the source is
    hashed (sha256) on a second thread meanwhile, and with ``with_crc`` (zip records
    need it) each tensor's CRC-32 is taken there too. :func:`verify_output` then parses the
    finished file and requires every tensor to sit exactly where its compared bytes
    were written, so the source is read once and the output once. ``on_bytes`` hears
    of every piece of tensor bytes handed to the writer (a progress bar).

    Reading, hashing, writing and comparing each run on a thread of their own
    (:class:`_Pipeline`): beside a CPU-bound process on two cores, a 2 GB convert took
    2.5x ``cp && sync`` with the writes and read-backs on the reading thread, 1.9x
    split (docs/benchmarks.md).
    """

    def __init__(self, hashed: str | None = None) -> None:
        self.hashed = hashed
        self.with_crc = False
        self.source_sha256: str | None = None
        self.on_bytes: Callable[[int], None] = _ignore
        self._placed: list[tuple[TensorData, int, int]] = []
        self._crcs: dict[object, int] = {}
        # (output fd, offset) of each tensor's writes: most have one (a set each was
        # 31 MiB at 100,000 tensors, a list is a third of it).
        self._written: dict[object, list[tuple[int, int]]] = {}

    def place(self, data: TensorData, out_fd: int, position: int) -> None:
        """Write ``data`` at ``position`` of the output open as ``out_fd``."""
        self._placed.append((data, out_fd, position))

    def crc32(self, data: TensorData) -> int:
        """The CRC-32 of ``data`` as it was copied (``with_crc``, after :meth:`copy`)."""
        return self._crcs[_key(data)]

    def written_at(self, data: TensorData, out_fd: int) -> set[int]:
        """Offsets in the output ``out_fd`` where ``data`` was written and compared."""
        return {at for fd, at in self._written.get(_key(data), ()) if fd == out_fd}

    def copy(self) -> None:
        """Write every placed tensor; afterwards ``source_sha256`` and the CRCs are known.

        Raises:
            VerificationError: bytes read back differ from the bytes written.
        """
        by_file: dict[str, dict[ByteSource, list[tuple[int, int]]]] = {}
        for data, out_fd, position in self._placed:
            self._written.setdefault(_key(data), []).append((out_fd, position))
            if isinstance(data, ByteSource):
                by_file.setdefault(data.file, {}).setdefault(data, []).append((out_fd, position))
            else:
                self._write_in_memory(out_fd, data, position)
        if self.hashed is not None and self.hashed not in by_file:
            self.source_sha256 = sha256_file(self.hashed)
        for file, placed in by_file.items():
            self._stream(file, placed)

    def _write_in_memory(self, out_fd: int, data: bytes | ComputedBytes, position: int) -> None:
        # Computed bytes are made here and freed when this call returns.
        made = memoryview(data.materialize() if isinstance(data, ComputedBytes) else data)
        for start in range(0, len(made), CHUNK):
            _write_and_compare(out_fd, made[start : start + CHUNK], position + start)
        if self.with_crc:
            self._crcs[_key(data)] = zlib.crc32(made)
        self.on_bytes(len(made))

    def _stream(self, file: str, placed: Mapping[ByteSource, list[tuple[int, int]]]) -> None:
        stretches = sorted(
            (_Stretch(s, p) for s, p in placed.items()), key=lambda s: s.source.offset
        )
        pending, active = collections.deque(stretches), []
        whole = self.hashed == file
        with open(file, "rb", buffering=0) as f, _Pipeline(whole) as pipeline:
            size = os.fstat(f.fileno()).st_size
            for start, view in _read_chunks(f.fileno(), _spans(stretches, size, whole)):
                end = start + len(view)
                while pending and pending[0].source.offset < end:
                    active.append(pending.popleft())
                parts = [(s, *_overlap(s, start, view)) for s in active]
                parts = [(s, low, part) for s, low, part in parts if len(part)]
                runs = _runs(
                    view,
                    (
                        (low - start, len(part), out_fd, position + low - s.source.offset)
                        for s, low, part in parts
                        for out_fd, position in s.positions
                    ),
                )
                pipeline.add(
                    view,
                    crc_parts=[(s, part) for s, _, part in parts] if self.with_crc else [],
                    writes=runs,
                )
                self.on_bytes(sum(len(part) for _, _, part in parts))
                active = [s for s in active if s.end > end]
            sha256 = pipeline.finish()
        if any(s.source.length for s in [*pending, *active]):
            raise OSError(errno.EIO, f"{file}: ended before the tensor bytes it lists")
        self._crcs.update((s.source, s.crc) for s in stretches)
        if whole:
            self.source_sha256 = sha256


# A run: output fd, offset there, and the parts of a chunk that go there back to back.
_Run = tuple[int, int, list[memoryview]]


def _runs(view: memoryview, writes: Iterable[tuple[int, int, int, int]]) -> list[_Run]:
    """The writes of a chunk, each given as (offset in ``view``, length, output fd,
    offset there), as runs: parts that continue one another in the chunk and in the
    output are one part; small parts that continue one another in the output only
    (a zip's records) are one run (one system call to write, one to read back).

    At 100,000 small tensors a write, a read-back and a hand-over each cost more than
    the bytes: a 1.5 MiB convert took 4.4 s and 420 MiB with one of each per tensor.
    Large parts stay runs of their own: a run's parts are joined to be compared, a copy
    of most of a 2 GB file when chunk ends fall between tensors."""
    runs: list[_Run] = []
    last_at = last_end = -1  # of the last part, in the chunk and in the output
    for at, length, fd, position in writes:
        follows = bool(runs) and runs[-1][0] == fd and position == last_end
        parts = runs[-1][2] if follows else []
        if follows and at == last_at + len(parts[-1]):
            parts[-1] = view[last_at : at + length]
        elif follows and max(length, len(parts[-1])) < _GATHERED_PART:
            parts.append(view[at : at + length])
            last_at = at
        else:
            runs.append((fd, position, [view[at : at + length]]))
            last_at = at
        last_end = position + length
    return runs


# Parts below this size are gathered into runs (a tensor of 16 Ki floats).
_GATHERED_PART = 64 * 1024
# Bytes of runs read back in one hand-over to the read-back thread.
_CHECKED_TOGETHER = 256 * 1024


def _overlap(stretch: _Stretch, start: int, view: memoryview) -> tuple[int, memoryview]:
    """(offset in the source, bytes) of the part of ``view`` (at ``start``) in ``stretch``."""
    low = max(stretch.source.offset, start)
    high = min(stretch.end, start + len(view))
    return low, view[low - start : max(low, high) - start]


def _write_and_compare(out_fd: int, part: memoryview, position: int) -> None:
    """Write ``part`` at ``position`` and read it back: the file must hold those bytes.

    Raises:
        VerificationError: it does not (a short or lost write, a filesystem that
            changes data, a bug placing two things at one offset).
    """
    _write(out_fd, part, position)
    _compare_written(out_fd, part, position)


def _compare_written(out_fd: int, part: memoryview, position: int) -> None:
    """Read back what was written at ``position``: the file must hold ``part``.

    Raises:
        VerificationError: it does not.
    """
    # A bytearray compares with a buffer by memcmp (a memoryview compares item by
    # item); one of CHUNK bytes is reused, as a fresh one would be faulted in each time.
    reused = _READ_BACK.buffer
    back = reused if len(part) == len(reused) else bytearray(len(part))
    if os.preadv(out_fd, [back], position) != len(part) or back != part:
        raise VerificationError(
            f"the output's bytes at offset {position} differ when read back from what was "
            "written (a failing disk or filesystem?); nothing was written"
        )
    _start_write_back(out_fd, position, len(part))


def _start_write_back(out_fd: int, position: int, length: int) -> None:
    """Start writing compared bytes to disk now, without waiting for it.

    Linux starts write-back only past dirty_background_ratio (10% of memory: 2.3 GB
    here), so a 2 GB output stayed in memory until the final fsync wrote all of it
    (0.5 s of a 1.6-2 s convert; now under 0.01 s). POSIX_FADV_DONTNEED starts
    write-back of the range (WB_SYNC_NONE); pages still being written are not dropped,
    so the output stays cached (re-read in 0.08 s after a 2 GB convert, as before).
    A hint: where it is missing, the final fsync writes everything, as before.
    """
    if _FADVISE is not None:
        with contextlib.suppress(OSError):  # a hint: a filesystem may refuse it
            _FADVISE(out_fd, position, length, os.POSIX_FADV_DONTNEED)


_FADVISE = getattr(os, "posix_fadvise", None)  # not on macOS or Windows


class _ReadBackBuffer(threading.local):
    """One CHUNK-sized read-back buffer per thread."""

    def __init__(self) -> None:
        self.buffer = bytearray(CHUNK)


_READ_BACK = _ReadBackBuffer()


def _compare_runs(runs: Sequence[_Run]) -> None:
    """Read each run back: the file must hold its parts, back to back.

    Raises:
        VerificationError: it does not.
    """
    for out_fd, position, parts in runs:
        if len(parts) == 1:
            _compare_written(out_fd, parts[0], position)
        else:  # small parts of one chunk, joined
            _compare_written(out_fd, memoryview(b"".join(parts)), position)


def _write_parts(out_fd: int, parts: list[memoryview], position: int) -> None:
    """Write ``parts`` back to back at ``position``, gathered into one system call
    (per IOV_MAX of them) where the platform has one."""
    if len(parts) == 1 or not hasattr(os, "pwritev"):  # not on Windows
        for part in parts:
            _write(out_fd, part, position)
            position += len(part)
        return
    for first in range(0, len(parts), _IOV_MAX):
        batch = parts[first : first + _IOV_MAX]
        written = os.pwritev(out_fd, batch, position)
        for part in batch:  # after a short write, the parts not whole are written again
            if written < len(part):
                _write(out_fd, part, position)
            written -= len(part)
            position += len(part)


_IOV_MAX = 1024  # POSIX's minimum is 16; Linux, macOS and the BSDs allow 1024


def _write(out_fd: int, part: memoryview, position: int) -> None:
    written = 0
    while written < len(part):
        written += os.pwrite(out_fd, part[written:], position + written)


_InFlight = tuple["Future[None] | None", "Future[list[Future[None]]] | None"]


class _Pipeline:
    """The stages after a chunk is read, each on one thread of its own, in order:
    the sha256 of the file (when ``whole``) and the CRC-32s of tensor parts; the
    writes; the read-back comparisons (with the write-back hint).

    Up to ``_READ_BUFFERS - 1`` chunks are in flight, so a stage that the scheduler
    holds back does not stall the others (beside a busy process, lock-step hand-over
    cost a third more time); a chunk's buffer is read into again only after every
    stage is done with it. Stage errors surface in :meth:`add` or :meth:`finish`;
    work not yet started is then cancelled.
    """

    def __init__(self, whole: bool) -> None:
        self._sha256 = hashlib.sha256() if whole else None
        # Named, so that tests/killpoints.py counts this command's own writes.
        self._digests = ThreadPoolExecutor(1, thread_name_prefix="ckptool-digest")
        self._writes = ThreadPoolExecutor(1, thread_name_prefix="ckptool-write")
        self._checks = ThreadPoolExecutor(1, thread_name_prefix="ckptool-check")
        # Per chunk: its digest, and its writes (which give the read-backs they queued).
        self._in_flight: collections.deque[_InFlight] = collections.deque()

    def add(
        self,
        view: memoryview,
        *,
        crc_parts: Sequence[tuple[_Stretch, memoryview]],
        writes: Sequence[_Run],
    ) -> None:
        """Hand over a chunk: ``view`` to hash, ``crc_parts`` to fold into their
        stretches' CRC-32s, ``writes`` (output fd, offset, parts of ``view`` to write
        there back to back) to write."""
        while len(self._in_flight) >= _READ_BUFFERS - 1:
            self._retire(self._in_flight.popleft())
        digest = None
        if self._sha256 is not None or crc_parts:
            digest = self._digests.submit(self._digest, view, crc_parts)
        written = self._writes.submit(self._write_all, writes) if writes else None
        self._in_flight.append((digest, written))

    def _digest(self, view: memoryview, parts: Sequence[tuple[_Stretch, memoryview]]) -> None:
        if self._sha256 is not None:
            self._sha256.update(view)
        for stretch, part in parts:
            stretch.crc = zlib.crc32(part, stretch.crc)

    def _write_all(self, writes: Sequence[_Run]) -> list[Future[None]]:
        # Runs are read back in batches of _CHECKED_TOGETHER bytes or more, handed over
        # as each fills: a large tensor is read back while the next is written, and
        # 100,000 small ones (into a zip: a run each) are not 100,000 hand-overs.
        checks, batch, size = [], [], 0
        for run in writes:
            out_fd, position, parts = run
            _write_parts(out_fd, parts, position)
            batch.append(run)
            size += sum(map(len, parts))
            if size >= _CHECKED_TOGETHER:
                checks.append(self._checks.submit(_compare_runs, batch))
                batch, size = [], 0
        if batch:
            checks.append(self._checks.submit(_compare_runs, batch))
        return checks

    @staticmethod
    def _retire(chunk: _InFlight) -> None:
        digest, written = chunk
        if digest is not None:
            digest.result()
        for check in written.result() if written is not None else ():
            check.result()

    def finish(self) -> str | None:
        """Wait for every chunk; the sha256 (hex) when hashing."""
        while self._in_flight:
            self._retire(self._in_flight.popleft())
        return None if self._sha256 is None else self._sha256.hexdigest()

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, *_: object) -> None:
        # After an error, queued work is dropped; the running piece is waited for.
        for pool in (self._digests, self._writes, self._checks):
            pool.shutdown(wait=True, cancel_futures=True)


def _ignore(_: int) -> None:
    pass


def _key(data: TensorData) -> object:
    # Ranges are equal by value (tied names share one); in-memory bytes by identity,
    # which the payload keeps alive, so hashing big bytes objects is never needed.
    return data if isinstance(data, ByteSource) else id(data)


def data_length(data: TensorData) -> int:
    """Bytes of tensor data, wherever they come from."""
    return len(data) if isinstance(data, bytes) else data.length


def _spans(stretches: Sequence[_Stretch], size: int, whole: bool) -> list[tuple[int, int]]:
    """The stretches of the file to read: all of it when hashed, else the tensor ranges
    with small gaps (zip headers) read through rather than seeked over."""
    if whole:
        return [(0, size)]
    spans: list[tuple[int, int]] = []
    for stretch in stretches:
        low, high = stretch.source.offset, stretch.end
        if spans and low <= spans[-1][1] + _GAP:
            spans[-1] = (spans[-1][0], max(spans[-1][1], high))
        else:
            spans.append((low, high))
    return spans


# Chunks read ahead of the stages (see _Pipeline), 24 MiB in all. Beside a busy process,
# 2 x 8 MiB (lock-step) took 2.7 s, 4 x 8 MiB 2.3 s, 6 x 4 MiB 2.0 s; 8 to 12 were no faster.
_READ_BUFFERS = 6


def _read_chunks(fd: int, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
    """(offset, bytes) of ``spans`` in CHUNK pieces, taking _READ_BUFFERS buffers in
    turn: a chunk stays valid while the next ones are read (the pipeline may be on it)."""
    size = min(CHUNK, max((high - low for low, high in spans), default=0))
    buffers = [bytearray(size) for _ in range(_READ_BUFFERS)]
    count = 0
    for low, high in spans:
        for start in range(low, high, CHUNK):
            view = memoryview(buffers[count % _READ_BUFFERS])[: min(CHUNK, high - start)]
            got = os.preadv(fd, [view], start)
            if got == 0:
                return  # the file is shorter than its index says: the caller reports it
            count += 1
            yield start, view[:got]


# --- safetensors ---------------------------------------------------------------------

# A fixed-width stand-in for the source's sha256, known only after the copy.
_PLACEHOLDER = "#" * 64


def write_safetensors(
    handle: BinaryIO,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    payload: Payload,
) -> None:
    """Write ``tensors`` as safetensors into ``handle`` through ``payload``; when the
    payload hashes its source, the sha256 lands in the metadata as SOURCE_SHA256."""
    header = place_safetensors(handle, tensors, metadata, payload)
    payload.copy()
    finish_safetensors(handle, header, payload)


def place_safetensors(
    handle: BinaryIO,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    payload: Payload,
) -> bytes:
    """Write the header of a safetensors file and place its tensors in ``payload``
    (one of several files sharing it: shards); returns the header for
    :func:`finish_safetensors`, after the payload's copy."""
    hashed = {SOURCE_SHA256: _PLACEHOLDER} if payload.hashed is not None else {}
    header: dict[str, object] = {"__metadata__": {**metadata, **hashed}}
    position = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": SAFETENSORS_CODES[tensor.dtype],
            "shape": header_shape(tensor.dtype, tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        position += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    out_fd = handle.fileno()
    os.pwrite(out_fd, len(encoded).to_bytes(8, "little") + encoded, 0)
    position = 8 + len(encoded)
    for tensor in tensors:
        payload.place(tensor.data, out_fd, position)
        position += tensor.nbytes
    return encoded


def finish_safetensors(handle: BinaryIO, header: bytes, payload: Payload) -> None:
    """After the payload's copy: the source's sha256 into the header's placeholder."""
    if payload.source_sha256 is not None:
        _patch_placeholder(handle.fileno(), header, SOURCE_SHA256, payload.source_sha256)


def _patch_placeholder(out_fd: int, encoded: bytes, key: str, value: str) -> None:
    if len(value) != len(_PLACEHOLDER):
        raise ValueError(f"metadata {key!r} must be {len(_PLACEHOLDER)} characters")
    marker = json.dumps(key).encode() + b":" + json.dumps(_PLACEHOLDER).encode()
    offset = encoded.index(marker) + len(marker) - len(_PLACEHOLDER) - 1
    os.pwrite(out_fd, value.encode(), 8 + offset)


# --- provenance and verification -----------------------------------------------------


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in bounded chunks."""
    hasher = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            hasher.update(view[:count])
    return hasher.hexdigest()


def verify_output(
    written: CheckpointMeta,
    expected: Sequence[OutTensor],
    payload: Payload,
    out_fd: int,
    *,
    aliases: Mapping[str, str] = {},
) -> None:
    """Check the written file, parsed by our own reader, against the plan.

    Names, dtypes and shapes must match exactly, and every tensor must sit at an offset
    where the payload wrote its bytes and compared them with the source's; a tied name
    stored once (bytes in memory never placed themselves) is compared in full here.

    Raises:
        VerificationError: anything differs.
    """
    names = [t.name for t in expected]
    present = [n for n in written.tensors if n not in aliases]
    if sorted(present) != sorted(names):
        raise VerificationError(f"{written.path}: written keys differ from the plan")
    for tensor in expected:
        meta = written.tensors[tensor.name]
        if (meta.dtype, meta.shape) != (tensor.dtype, tensor.shape):
            raise VerificationError(
                f"{written.path}: {tensor.name!r} was written as {meta.dtype}{list(meta.shape)}"
            )
        if not _in_place(meta, tensor.data, payload.written_at(tensor.data, out_fd)):
            raise VerificationError(
                f"{written.path}: bytes of {tensor.name!r} differ from the source"
            )


def _in_place(meta: TensorMeta, data: TensorData, written_at: set[int]) -> bool:
    located = meta.byte_range
    if located is None or located[2] != data_length(data):
        return False
    file, offset, length = located
    if offset in written_at:
        return True
    if not isinstance(data, bytes):
        return False
    with open(file, "rb", buffering=0) as f:
        back = bytearray(length)
        return os.preadv(f.fileno(), [back], offset) == length and back == data
