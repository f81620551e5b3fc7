"""A STOW-RS request body, ``multipart/related; type="application/dicom"``, spooled to disk as it arrives.

The body is fed chunk by chunk to python-multipart's streaming parser, and each part's
bytes are appended to one unnamed temporary file; memory holds a chunk, never the
request. The limits are enforced while the body arrives, so a request over them is
refused (413) before any of its instances is handed to the ingest: all or nothing.

Why python-multipart: it is the parser Starlette (hence FastAPI) uses for forms, well
kept and fuzzed, and its low-level :class:`MultipartParser` is a push parser for any
``multipart/*`` body given the boundary, which is what streaming needs. The stdlib
``email`` parser would do, but it wants the whole message in memory (a STOW-RS request
of a study is hundreds of megabytes) and builds a Message object per part;
``dicomweb-client``'s own decoder is a client-side helper over a bytes object.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

DICOM_MEDIA_TYPE = "application/dicom"
MAX_PREAMBLE_BYTES = 64 * 1024
"""Text before the first boundary (RFC 2046 allows a preamble) is skipped, up to this much."""


class BodyError(Exception):
    """The request body cannot be taken: ``status`` is the HTTP answer (400, 413, 415), ``message`` says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Part:
    """One part of the body: where its bytes lie in the spool, and its own Content-Type (if any)."""

    offset: int
    length: int
    content_type: str | None


def boundary_of(content_type: str | None) -> str:
    """The boundary of a ``multipart/related; type="application/dicom"`` Content-Type, or BodyError (415/400)."""
    message = Message()
    message["Content-Type"] = content_type or ""
    if message.get_content_type() != "multipart/related":
        raise BodyError(415, f'STOW-RS takes multipart/related; type="{DICOM_MEDIA_TYPE}", not {content_type!r}')
    kind = message.get_param("type")
    if isinstance(kind, str) and kind.strip().lower() != DICOM_MEDIA_TYPE:
        raise BodyError(415, f"this server stores Part 10 instances only (type={DICOM_MEDIA_TYPE}), not type={kind}")
    boundary = message.get_boundary()
    if not boundary or len(boundary) > 70:
        raise BodyError(400, "the multipart/related Content-Type names no valid boundary")
    return boundary


@dataclass
class SpooledParts:
    """Feed the body with :meth:`write`, then :meth:`finish`; read each part with :meth:`read`.

    ``folder``: where the spool lives (the storage volume, not a small /tmp); the file
    has no name and disappears when closed or when the process dies.
    """

    boundary: str
    max_body_bytes: int
    max_parts: int
    folder: Path | None = None
    parts: list[Part] = field(default_factory=list)
    received_bytes: int = 0
    _spool: IO[bytes] = field(init=False)
    _parser: MultipartParser = field(init=False)
    _offset: int = 0
    _start: int = 0
    _in_part: bool = False
    _header_field: bytes = b""
    _header_value: bytes = b""
    _content_type: str | None = None
    _ended: bool = False
    _head: bytes | None = b""
    """What arrived before the first boundary was found; None once it was."""

    def __post_init__(self) -> None:
        folder = self.folder if self.folder is not None and self.folder.is_dir() else None
        self._spool = tempfile.TemporaryFile(prefix="stow-", dir=folder)  # noqa: SIM115  # closed by close()
        self._parser = MultipartParser(
            self.boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_header_field": self._header_field_data,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        """Parse ``chunk``; BodyError 413 past a limit, 400 when the body is not multipart."""
        self.received_bytes += len(chunk)
        if self.received_bytes > self.max_body_bytes:
            raise BodyError(413, f"the request body exceeds api.stow_max_body_bytes ({self.max_body_bytes} bytes)")
        if self._head is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BodyError(400, f"the body is not valid multipart/related: {_message(exc)}") from exc

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """The body from its first boundary on, once it has arrived; b"" until then."""
        assert self._head is not None
        head = self._head + chunk
        delimiter = b"--" + self.boundary.encode("latin-1")
        at = 0 if head.startswith(delimiter) else head.find(b"\r\n" + delimiter)
        if at < 0:
            if len(head) > MAX_PREAMBLE_BYTES:
                raise BodyError(400, f"no multipart boundary in the first {MAX_PREAMBLE_BYTES} bytes of the body")
            self._head = head
            return b""
        self._head = None
        return head[at + 2 if at else 0:] if head[at:at + 2] == b"\r\n" else head[at:]

    def finish(self) -> list[Part]:
        """The parts, once the whole body was fed; BodyError 400 if it was cut short or held none."""
        if self._head is not None:
            raise BodyError(400, "the body holds no multipart boundary")
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise BodyError(400, f"the body is not valid multipart/related: {_message(exc)}") from exc
        if not self._ended:
            raise BodyError(400, "the multipart body ends before its closing boundary")
        if not self.parts:
            raise BodyError(400, "the request holds no instance")
        self._spool.flush()  # read() reads the file, not the write buffer
        return self.parts

    def read(self, part: Part) -> bytes:
        """The part's bytes (safe from several threads at once: positional reads)."""
        chunks, done = [], 0
        while done < part.length:
            chunk = os.pread(self._spool.fileno(), part.length - done, part.offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._spool.close()

    # -- parser callbacks ---------------------------------------------------------------

    def _part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise BodyError(413, f"the request holds more than api.stow_max_parts ({self.max_parts}) instances")
        self._in_part = True
        self._start = self._offset
        self._content_type = None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._spool.write(data[start:end])
        self._offset += end - start

    def _part_end(self) -> None:
        if self._in_part:
            self.parts.append(Part(self._start, self._offset - self._start, self._content_type))
        self._in_part = False

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.strip().lower() == b"content-type":
            self._content_type = self._header_value.decode("latin-1").strip()
        self._header_field = self._header_value = b""

    def _end(self) -> None:
        self._ended = True


def _message(exc: MultipartParseError) -> str:
    """The parser's message (python-multipart 0.0.x repeats it)."""
    text = str(exc)
    half = len(text) // 2
    return text[:half] if len(text) % 2 == 0 and text[:half] == text[half:] else text
