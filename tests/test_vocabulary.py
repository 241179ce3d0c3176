"""The label vocabulary as users hand it over: Google's file, a spreadsheet's re-save (UTF-8 with a
byte-order mark), and the broken files refused in one line naming the file and the line. Both databases."""

import codecs

import pytest

from storage.database.db import engine_for
from tests.support.cli import vtag
from tests.support.env import SHARED
from tests.support.worlds import count, rows

REAL = SHARED / "yt8m" / "vocabulary.csv"


def _lines() -> list[bytes]:
    return REAL.read_bytes().splitlines(keepends=True)


def test_a_spreadsheets_byte_order_mark_is_accepted(tmp_path, db_url):
    resaved = tmp_path / "vocabulary.csv"
    resaved.write_bytes(codecs.BOM_UTF8 + REAL.read_bytes())
    result = vtag("vocabulary", resaved, "--db", db_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"3862 labels loaded from {resaved}"
    assert count(db_url, "SELECT COUNT(*) FROM labels") == 3862
    # The first column kept its name and the first label its Index, with nothing of the mark left over.
    first_name = REAL.read_text(encoding="utf-8").splitlines()[1].split(",")[3]
    assert rows(db_url, "SELECT name FROM labels WHERE label_id = 0") == [(first_name,)]


def _broken(tmp_path, line_number: int, replacement: bytes):
    lines = _lines()
    lines[line_number - 1] = replacement
    path = tmp_path / "vocabulary.csv"
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.parametrize(
    "line_number, replacement, reason",
    [
        (3, b"0,1,/m/x,Twice,,Games,,\n", "line 3: Index 0 already given on line 2"),
        (5, b"3862,1,/m/x,Past the end,,Games,,\n", "line 5: Index 3862 outside 0..3861"),
        (7, b"-1,1,/m/x,Negative,,Games,,\n", "line 7: Index -1 outside 0..3861"),
        (9, b"nine,1,/m/x,Not a number,,Games,,\n", "line 9: invalid literal for int() with base 10: 'nine'"),
        (11, b"10,1,/m/x,Caf\xe9 in Latin-1,,Food,,\n", "line 11: not UTF-8 (invalid continuation byte: byte 0xe9)"),
    ],
)
def test_a_broken_vocabulary_is_refused_in_one_line_naming_file_and_line(
    tmp_path, db_url, line_number, replacement, reason
):
    path = _broken(tmp_path, line_number, replacement)
    result = vtag("vocabulary", path, "--db", db_url)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"vtag vocabulary: error: {path}, {reason}"]
    with engine_for(db_url).connect():  # nothing half-loaded: the labels table stayed empty
        assert count(db_url, "SELECT COUNT(*) FROM labels") == 0
