from __future__ import annotations

import pytest

from speedrun.flops import mfu, peak_flops


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H20", 148e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 125e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA B200", 2.25e15),
        ("NVIDIA GeForce RTX 4090", 165e12),
        ("NVIDIA GeForce RTX 5090", 209e12),
        ("NVIDIA GeForce RTX 3090", 71e12),
    ],
)
def test_peak_flops_picks_the_most_specific_name(name, expected):
    assert peak_flops(name) == expected


@pytest.mark.parametrize("name", [None, "", "cpu", "NVIDIA RTX A1000", "Tesla T4", "Apple M2"])
def test_unknown_devices_have_no_peak(name):
    assert peak_flops(name) is None


def test_mfu_is_achieved_over_total_peak():
    # 8 H100s at 1e6 tokens/s and 4e8 FLOPs/token: 4e14 / (8 * 989e12)
    assert mfu(1e6, 4e8, 8, "NVIDIA H100 80GB HBM3") == pytest.approx(4e14 / (8 * 989e12))
    assert mfu(1e6, 4e8, 1, "NVIDIA H100 PCIe") == pytest.approx(4e14 / 756e12)


def test_mfu_is_none_off_gpu_and_refuses_bad_world_size():
    assert mfu(1e6, 4e8, 1, "cpu") is None
    assert mfu(1e6, 4e8, 1, None) is None
    with pytest.raises(ValueError, match="world_size=0"):
        mfu(1e6, 4e8, 0, "NVIDIA H100 80GB HBM3")
