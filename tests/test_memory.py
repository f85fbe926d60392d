import ctypes
import subprocess
import sys

import pytest

# Counts the blocks glibc serves with mmap (mallinfo2's hblks) around a 1 MiB allocation, after a freed 8 MiB
# one has raised glibc's own threshold past 1 MiB.
SCRIPT = '''
import ctypes, sys
import numpy as np
from cifar_fastai.memory import return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                               'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == 'fixed': assert return_freed_memory()
big = np.ones(8 << 20, np.uint8)
del big
before = libc.mallinfo2().hblks
block = np.ones(1 << 20, np.uint8)
print(libc.mallinfo2().hblks - before)
'''


def mmapped_blocks(mode):
    res = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(res.stdout)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), 'mallinfo2'), reason="needs glibc's malloc (2.33 or later)")
def test_large_blocks_stay_mmapped_so_freeing_them_returns_the_memory():
    assert mmapped_blocks('glibc default') == 0  # the 1 MiB block came from the heap, which never shrinks
    assert mmapped_blocks('fixed') == 1
