"""Weight memory of the CPU backend (stablelm_fast/ops/cpu_memory.py, csrc/cpu/memory.cpp): 2 MiB-aligned,
huge pages advised, freed with the tensor; packed weights live there."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from stablelm_fast.ops import cpu_linear, cpu_memory, cpu_quant
from stablelm_fast.ops import quant_reference as qref

MIB = 1 << 20


def _mapped(addr: int) -> bool:
    """Whether addr lies in a mapping of this process (/proc/self/maps)."""
    with open("/proc/self/maps", encoding="ascii") as f:
        for line in f:
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            if lo <= addr < hi:
                return True
    return False


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


@pytest.mark.parametrize("nbytes", [0, 1000, 2 * MIB - 1, 2 * MIB, 5 * MIB + 123])
def test_weight_empty_is_writable_and_sized(nbytes):
    t = torch.ops.stablelm_fast.cpu_weight_empty(nbytes)
    assert t.dtype == torch.uint8 and t.shape == (nbytes,) and t.is_contiguous()
    t.fill_(7)
    assert int(t.sum()) == 7 * nbytes
    if nbytes >= 2 * MIB:
        assert t.data_ptr() % (2 * MIB) == 0


def test_weight_memory_is_unmapped_when_freed():
    t = torch.ops.stablelm_fast.cpu_weight_empty(6 * MIB)
    t.fill_(1)
    addr = t.data_ptr()
    assert _mapped(addr)
    del t
    gc.collect()
    assert not _mapped(addr)


def test_weight_memory_gets_huge_pages_where_linux_allows():
    if not os.path.exists("/proc/self/smaps") or _thp_mode() not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {_thp_mode()} here")
    t = torch.ops.stablelm_fast.cpu_weight_empty(8 * MIB)
    t.fill_(1)
    addr, huge_kb = t.data_ptr(), None
    with open("/proc/self/smaps", encoding="ascii") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                huge_kb = int(line.split()[1])
                break
    assert huge_kb is not None
    if huge_kb == 0:
        pytest.skip("Linux gave no huge page now (memory fragmented); the advice is only advice")
    assert huge_kb >= 2048


def test_packed_weights_equal_and_in_weight_memory(monkeypatch):
    w = torch.randn(1024, 1024)
    qw, s, z = qref.quantize_weight(w, 4, 128)
    plain_bf16 = None
    for flag in ("0", "1"):
        monkeypatch.setenv("STABLELM_FAST_HUGE_PAGES", flag)
        packed = cpu_quant.pack_quant_weight(qw, s, z, 4, 128)
        bf16 = cpu_linear.pack_linear_weight(w.bfloat16())
        if flag == "0":
            plain, plain_bf16 = packed, bf16
            continue
        for a, b in zip(packed, plain):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b) and a.dtype == b.dtype and a.is_contiguous()
        assert torch.equal(bf16, plain_bf16)
        assert bf16.data_ptr() % (2 * MIB) == 0  # 2 MiB of bf16: huge-page memory
    assert cpu_memory.enabled()
    monkeypatch.delenv("STABLELM_FAST_HUGE_PAGES")
    assert cpu_memory.enabled()  # the default (cpu_memory's docstring: faster GEMMs, slower first touch at load)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_release_free_heap_returns_what_temporaries_freed():
    """Small temporaries freed below a live one stay in glibc's heap (resident) until release_free_heap, which the
    model runner calls after loading."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    temps = [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KiB each (below glibc's mmap threshold): ~128 MiB
    keep = torch.ones(16 * 1024)  # above them on the heap: the heap cannot shrink from its top
    before = _rss_bytes()
    del temps
    gc.collect()
    freed_but_resident = _rss_bytes()
    cpu_memory.release_free_heap()
    after = _rss_bytes()
    assert keep.sum() == 16 * 1024
    if before - freed_but_resident > 64 * MIB:
        pytest.skip("this allocator returned the temporaries by itself")
    assert freed_but_resident - after > 64 * MIB, (before, freed_but_resident, after)
