import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: on a small shared machine two threads make tiny kernels 10-100x slower
# and their timing erratic; results are identical either way.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def toy_profile():
    """Round numbers so event times can be worked out by hand."""
    from specplan.hardware import HardwareProfile

    return HardwareProfile.from_dict(toy_profile_dict(), "toy")


def toy_profile_dict(**gpu_overrides):
    path = {"latency_s": 0.0, "bytes_per_s": 1e9}
    gpu = {"name": "toy", "memory_bytes": 8e9, "peak_flops_per_s": {"float32": 1e12, "bfloat16": 1e12},
           "memory_bandwidth_bytes_per_s": 1e11, "matmul_efficiency": 1.0, "bandwidth_efficiency": 1.0,
           "kernel_launch_s": 0.0, "reserved_bytes": 0.0, **gpu_overrides}
    return {
        "schema_version": 1, "name": "toy",
        "provenance": {"kind": "datasheet", "sources": ["test"]},
        "gpu": gpu,
        "link": {"name": "toy", "h2d_pinned": path, "h2d_pageable": {"latency_s": 0.0, "bytes_per_s": 5e8},
                 "d2h_pinned": path, "d2h_pageable": {"latency_s": 0.0, "bytes_per_s": 5e8},
                 "duplex_factor": 1.0, "disk_read_bytes_per_s": 1e9},
        "host": {"name": "toy", "memory_bytes": 64e9, "cores": 2, "matmul_flops_per_s": {"float32": 1e11},
                 "memory_bandwidth_bytes_per_s": 1e10, "attention_efficiency": 1.0, "pinned_fraction": 1.0},
        "kernels": {},
    }
