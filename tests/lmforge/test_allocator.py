"""lmforge.allocator: glibc keeps a training step's memory for the next step, unless switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# In a fresh process (the settings are per process): how many bytes an 8 MB malloc added to glibc's
# mmap'ed blocks. glibc's default threshold (128 KB) maps it on its own; the tuned one (32 MB) does not.
PROBE = """
import ctypes, json
from lmforge.allocator import keep_freed_memory
tuned = keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
before = libc.mallinfo2().hblkhd
block = libc.malloc(8 << 20)
added = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({"tuned": tuned, "mmapped": added}))
"""


def probe(switch: str) -> dict:
    env = {**os.environ, "LMFORGE_MALLOC_TUNING": switch}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_an_8_mb_block_comes_from_the_heap_once_tuned_and_from_mmap_when_switched_off():
    assert probe("on") == {"tuned": True, "mmapped": 0}
    off = probe("off")
    assert off["tuned"] is False and off["mmapped"] >= 8 << 20
