"""Native memory of a process that scores segments.

glibc's malloc raises its mmap threshold each time a large mmapped block is freed (up to 32 MB), so after the
first batches the segment pass's per-batch temporaries (a few MB each: a batch's segments x 1,000 classes) come
from the heap instead, between the small buffers a part keeps until it ends, and the heap can only grow with the
night: a normal night with segments peaked at 765 MB at 10% of YouTube-8M (1,389 MB at 100%), against 408 MB with
the threshold fixed (`python -m benchmarks.scale --sizes 10 --stages segments`, docs/benchmarks.md). Fixing it
(which also turns the adjustment off) keeps every block above it in mmap, returned to the system when freed.
"""

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_BLOCK = 128 * 1024  # glibc's own starting threshold


def keep_large_blocks_mapped(threshold: int = LARGE_BLOCK) -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc (nothing done)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
