import io

import pytest

from storage.formats.tfrecord import BadRecordError, masked_crc, read_records, write_records
from tests.support.shards import flip_byte, record_offsets, write_shard


def test_masked_crc_matches_tensorflow_definition():
    # crc32c("123456789") is the Castagnoli check value 0xE3069283; masking as in TensorFlow's crc32c.h.
    crc = 0xE3069283
    assert masked_crc(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_round_trip_keeps_records_and_offsets():
    payloads = [b"", b"a", b"x" * 100_000]
    buf = io.BytesIO()
    assert write_records(buf, payloads) == 3
    buf.seek(0)
    records = list(read_records(buf, "mem"))
    assert [r.data for r in records] == payloads
    assert [r.offset for r in records] == [0, 16, 33]


@pytest.fixture
def shard(tmp_path):
    return write_shard(tmp_path / "train0000.tfrecord", [b"first", b"second record", b"third"])


def _read_all(path):
    with open(path, "rb") as f:
        return list(read_records(f, str(path), path.stat().st_size))


def test_data_crc_mismatch_names_record_and_offset(shard):
    second = record_offsets(shard)[1]
    flip_byte(shard, second + 12 + 2)  # a byte of the second record's data
    with pytest.raises(BadRecordError, match=r"record 1 at byte offset 21: data CRC mismatch") as err:
        _read_all(shard)
    assert (err.value.index, err.value.offset, err.value.name) == (1, second, str(shard))


def test_length_crc_mismatch(shard):
    flip_byte(shard, record_offsets(shard)[2] + 9)  # the length's CRC of the third record
    with pytest.raises(BadRecordError, match="record 2 .*length CRC mismatch"):
        _read_all(shard)


def test_truncated_shard(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-3])
    with pytest.raises(BadRecordError, match="record 2 .*truncated"):
        _read_all(shard)
    shard.write_bytes(data[: record_offsets(shard)[2] + 5])  # cut inside the third record's header
    with pytest.raises(BadRecordError, match="truncated record header"):
        _read_all(shard)


def test_truncated_without_known_size(shard):
    shard.write_bytes(shard.read_bytes()[:-1])
    with open(shard, "rb") as f, pytest.raises(BadRecordError, match="truncated record"):
        list(read_records(f, "s"))


def test_length_past_end_of_file(tmp_path):
    path = write_shard(tmp_path / "x.tfrecord", [b"y" * 50])
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BadRecordError, match="runs past the end"):
        _read_all(path)
