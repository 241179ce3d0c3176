"""TFRecord container: records laid end to end, each framed by a length and two masked CRC32Cs.

Layout (tensorflow/core/lib/io/record_writer.cc): uint64 length, uint32 masked crc32c(length bytes),
data, uint32 masked crc32c(data), all little-endian.
"""

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import google_crc32c

from storage.errors import VtagError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_MASK_DELTA = 0xA282EAD8


def masked_crc(data) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class BadRecordError(VtagError, ValueError):
    """A record that cannot be read or decoded; names the file, the record index and its byte offset."""

    def __init__(self, name: str, index: int, offset: int, reason: str):
        super().__init__(f"{name}: record {index} at byte offset {offset}: {reason}")
        self.name, self.index, self.offset, self.reason = name, index, offset, reason


@dataclass(frozen=True)
class Record:
    index: int
    offset: int
    data: bytes


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_records(stream: BinaryIO, name: str, size: int | None = None) -> Iterator[Record]:
    """Yield every record of a TFRecord stream, verifying both CRCs; raise BadRecordError on damage.

    `size`, when known, lets a corrupt length be caught before anything is read for it.
    """
    index = offset = 0
    while True:
        header = _read_exact(stream, _HEADER.size)
        if not header:
            return
        if len(header) < _HEADER.size:
            raise BadRecordError(name, index, offset, f"truncated record header ({len(header)} of 12 bytes)")
        length, length_crc = _HEADER.unpack(header)
        if masked_crc(header[:8]) != length_crc:
            raise BadRecordError(name, index, offset, "length CRC mismatch")
        if size is not None and length > size - offset - _HEADER.size - _FOOTER.size:
            raise BadRecordError(
                name, index, offset, f"truncated: record length {length} runs past the end of the file"
            )
        data = _read_exact(stream, length)
        footer = _read_exact(stream, _FOOTER.size)
        if len(data) < length or len(footer) < _FOOTER.size:
            raise BadRecordError(name, index, offset, f"truncated record (expected {length} data bytes)")
        if masked_crc(data) != _FOOTER.unpack(footer)[0]:
            raise BadRecordError(name, index, offset, "data CRC mismatch")
        yield Record(index, offset, data)
        index += 1
        offset += _HEADER.size + length + _FOOTER.size


def write_records(stream: BinaryIO, records: Iterable[bytes]) -> int:
    """Frame each serialized record as TensorFlow's RecordWriter does; return the number written."""
    count = 0
    for data in records:
        length = struct.pack("<Q", len(data))
        stream.write(length + struct.pack("<I", masked_crc(length)))
        stream.write(data)
        stream.write(_FOOTER.pack(masked_crc(data)))
        count += 1
    return count
