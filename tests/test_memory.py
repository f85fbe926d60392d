import ctypes
import subprocess
import sys

import pytest

# 200 blocks of 1 MiB in glibc's heap (a freed 8 MiB block first raises glibc's mmap threshold past 1 MiB), each
# followed by a smaller block that stays, so the freed ones are holes the heap cannot shrink past by itself: the
# process's resident memory before and after ReturnFreedMemory's end of epoch.
SCRIPT = '''
import sys
import numpy as np
from cifar_fastai.callbacks import ReturnFreedMemory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20
big = np.ones(8 << 20, np.uint8)
del big
blocks, kept = zip(*[(np.ones(1 << 20, np.uint8), np.ones(100_000, np.uint8)) for _ in range(200)])
del blocks
before = rss()
if sys.argv[1] == 'trim': ReturnFreedMemory().after_epoch()
print(before - rss())
'''


def freed_mib(mode):
    res = subprocess.run([sys.executable, '-c', SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(res.stdout)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), 'malloc_trim'), reason="needs glibc's malloc")
def test_memory_freed_during_an_epoch_goes_back_to_the_system_at_its_end():
    assert freed_mib('keep') < 20  # glibc left to itself keeps the 200 MiB
    assert freed_mib('trim') > 180
