"""Which row groups a ParquetBatches reads, and how many it holds, for the loader's memory tests."""

from model.data import ParquetBatches


def count_group_reads(monkeypatch) -> tuple[list[int], list[int]]:
    """(reads, held): each row group read from its file, in order, and after each columns lookup the number
    of groups held in memory; filled as the patched ParquetBatches streams."""
    reads, held = [], []
    real_columns = ParquetBatches._columns

    def counted(self, group_index, upcoming):
        if group_index not in self._cached:
            reads.append(group_index)
        columns = real_columns(self, group_index, upcoming)
        held.append(len(self._cached))
        return columns

    monkeypatch.setattr(ParquetBatches, "_columns", counted)
    return reads, held
