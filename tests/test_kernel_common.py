"""kernels/_common.host_value_once: a host-side value read from a metadata tensor once per tensor, not per layer."""

import torch

from stablelm_fast.kernels._common import host_value_once


def test_host_value_read_once_per_tensor_and_version():
    reads = []

    def longest(cu):
        reads.append(1)
        return (cu[1:] - cu[:-1]).max().item()

    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    assert [host_value_once("t", cu, longest) for _ in range(24)] == [7] * 24  # 24 layers, one read
    assert len(reads) == 1
    cu[2] = 20  # changed in place: read again
    assert host_value_once("t", cu, longest) == 17 and len(reads) == 2
    other = torch.tensor([0, 1, 2], dtype=torch.int32)  # the next step's tensor
    assert host_value_once("t", other, longest) == 1 and len(reads) == 3
    del cu, other
    fresh = torch.tensor([0, 5], dtype=torch.int32)  # possibly at a freed tensor's address: never a stale value
    assert host_value_once("t", fresh, longest) == 5 and len(reads) == 4
