"""Writing checkpoints: atomic outputs, streamed safetensors, read-back verification.

Every output goes to a temp file in the target directory, is fsynced, verified, given
normal permissions and renamed into place; on any failure the temp file is removed,
so a reader sees the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import BinaryIO

from ckptool.errors import CkptError, OutputError
from ckptool.formats.meta import CheckpointMeta, TensorMeta
from ckptool.formats.safetensors_header import SAFETENSORS_DTYPES

# torch dtype name -> safetensors code.
SAFETENSORS_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
# Bounded buffer for copies that cannot stay in the kernel, and for verification reads.
CHUNK = 8 * 1024 * 1024
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


class VerificationError(OutputError):
    """The written file does not hold what was meant to be written (exit 5, like any
    output problem: the input is fine, the output is not)."""


@dataclass(frozen=True)
class ByteSource:
    """Bytes to copy unchanged from a file."""

    file: str
    offset: int
    length: int


class ComputedBytes:
    """Bytes made only when they are written (a merged or cast tensor), so a plan of
    many holds none of them: one tensor's bytes are in memory at a time. Writing one
    records its sha256 and CRC-32, which verification and zip records use later."""

    def __init__(self, length: int, produce: Callable[[], bytes | bytearray]) -> None:
        self.length = length
        self._produce = produce
        self.sha256: bytes | None = None
        self.crc32: int | None = None

    def materialize(self) -> bytes | bytearray:
        data = self._produce()
        if len(data) != self.length:
            raise OutputError(f"a computed tensor has {len(data)} bytes, {self.length} planned")
        self.sha256, self.crc32 = hashlib.sha256(data).digest(), zlib.crc32(data)
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
        return len(self.data) if isinstance(self.data, bytes) else self.data.length


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
        raise OutputError(f"{out}: exists; add --force to replace it")


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
        raise _output_error(out, e) from e
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
            raise _output_error(out, e) from e
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
            "is, nothing was written; add --force to replace it"
        ) from e
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # No hard links here (some network and FAT filesystems): check, then rename.
        if os.path.lexists(out):
            raise OutputError(f"{out}: exists; add --force to replace it") from e
        os.replace(temp, out)
        return
    os.unlink(temp)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _output_error(out: str, e: OSError) -> OutputError:
    if e.errno in _NO_SPACE:
        return OutputError(f"{out}: no space left on the device; nothing was written")
    if e.errno in _NO_PERMISSION:
        return OutputError(f"{out}: no permission to write here; nothing was written")
    return OutputError(f"{out}: cannot write ({e.strerror or e}); nothing was written")


# --- safetensors ---------------------------------------------------------------------

# A fixed-width stand-in for metadata values known only after the copy (a sha256).
_PLACEHOLDER = "#" * 64


def write_safetensors(
    handle: BinaryIO,
    tensors: Sequence[OutTensor],
    metadata: Mapping[str, str],
    *,
    deferred: Mapping[str, Future[str]] | None = None,
) -> Callable[[], None]:
    """Write ``tensors`` as safetensors into ``handle``, copying file bytes in the kernel.

    ``deferred`` metadata values (64 characters, e.g. a hex sha256 computed in another
    thread while the bytes are copied) are written as placeholders; the returned
    function waits for them and patches them in, so verification can run meanwhile.
    """
    deferred = deferred or {}
    header: dict[str, object] = {
        "__metadata__": {**metadata, **dict.fromkeys(deferred, _PLACEHOLDER)}
    }
    position = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": SAFETENSORS_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        position += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    out_fd = handle.fileno()
    os.pwrite(out_fd, len(encoded).to_bytes(8, "little") + encoded, 0)
    data_start = 8 + len(encoded)
    position = data_start
    for tensor in tensors:
        _write_data(out_fd, tensor.data, position)
        position += tensor.nbytes
    pending = dict(deferred)

    def patch() -> None:
        for key, future in pending.items():
            _patch_placeholder(out_fd, encoded, key, future.result())

    return patch


def _patch_placeholder(out_fd: int, encoded: bytes, key: str, value: str) -> None:
    if len(value) != len(_PLACEHOLDER):
        raise ValueError(f"deferred metadata {key!r} must be {len(_PLACEHOLDER)} characters")
    marker = json.dumps(key).encode() + b":" + json.dumps(_PLACEHOLDER).encode()
    offset = encoded.index(marker) + len(marker) - len(_PLACEHOLDER) - 1
    os.pwrite(out_fd, value.encode(), 8 + offset)


def _write_data(out_fd: int, data: TensorData, position: int) -> None:
    if not isinstance(data, ByteSource):
        # Computed bytes are made here and freed when this call returns.
        view = memoryview(data.materialize() if isinstance(data, ComputedBytes) else data)
        written = 0
        while written < len(view):
            written += os.pwrite(out_fd, view[written : written + CHUNK], position + written)
        return
    with open(data.file, "rb") as source:
        copy_range(source.fileno(), out_fd, data.offset, position, data.length)


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy bytes between files without passing them through Python where the OS allows."""
    done = 0
    try:
        while done < length:
            copied = os.copy_file_range(
                src_fd, dst_fd, length - done, src_offset + done, dst_offset + done
            )
            if copied == 0:
                raise OSError(errno.EIO, "source ended early")
            done += copied
        return
    except OSError as e:
        # Cross-device or unsupported filesystems: fall back to a bounded buffer.
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while done < length:
        block = os.pread(src_fd, min(CHUNK, length - done), src_offset + done)
        if not block:
            raise OSError(errno.EIO, "source ended early")
        os.pwrite(dst_fd, block, dst_offset + done)
        done += len(block)


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


def sha256_in_background(path: str, pool: ThreadPoolExecutor) -> Future[str]:
    """Hash a file on another thread (hashlib releases the GIL) while the copy runs."""
    return pool.submit(sha256_file, path)


def verify_output(
    written: CheckpointMeta, expected: Sequence[OutTensor], *, aliases: Mapping[str, str] = {}
) -> None:
    """Compare the written file (read back by our own reader) with what was meant.

    Names, dtypes and shapes must match exactly, and every tensor's bytes are compared
    with their source, in bounded chunks.

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
        if not _same_bytes(meta, tensor.data):
            raise VerificationError(
                f"{written.path}: bytes of {tensor.name!r} differ from the source"
            )


def _same_bytes(meta: TensorMeta, data: TensorData) -> bool:
    located = meta.byte_range
    if located is None:
        return False
    file, offset, length = located
    if length != (len(data) if isinstance(data, bytes) else data.length):
        return False
    if isinstance(data, ComputedBytes):  # gone after the write: compare its hash
        return data.sha256 is not None and _sha256_range(file, offset, length) == data.sha256
    with ExitStack() as stack:
        out_fd = stack.enter_context(open(file, "rb", buffering=0)).fileno()
        expected = _expected_bytes(data, stack)
        for start in range(0, length, CHUNK):
            size = min(CHUNK, length - start)
            if os.pread(out_fd, size, offset + start) != expected(start, size):
                return False
    return True


def _sha256_range(file: str, offset: int, length: int) -> bytes:
    digest = hashlib.sha256()
    with open(file, "rb", buffering=0) as f:
        for start in range(0, length, CHUNK):
            digest.update(os.pread(f.fileno(), min(CHUNK, length - start), offset + start))
    return digest.digest()


def _expected_bytes(data: ByteSource | bytes, stack: ExitStack) -> Callable[[int, int], bytes]:
    """Read (start, size) of what should have been written, from memory or its source file."""
    if isinstance(data, bytes):
        return lambda start, size: data[start : start + size]
    # The caller's ExitStack closes it; ruff cannot see that.
    source_fd = stack.enter_context(open(data.file, "rb", buffering=0)).fileno()  # noqa: SIM115
    return lambda start, size: os.pread(source_fd, size, data.offset + start)
