"""Peak bf16 throughput by accelerator and model FLOPs utilization (MFU).

Peaks are the vendors' dense (no 2:4 sparsity) bf16 tensor-core figures with fp32 accumulation.
"""

from __future__ import annotations

import re

# Keyed by a whole-word part of torch.cuda.get_device_name() ("A100" matches "NVIDIA A100-SXM4-80GB"
# but not "RTX A1000"); the longest matching key wins, so "H100 PCIe" beats "H100".
PEAK_BF16_FLOPS: dict[str, float] = {
    # NVIDIA data centre
    "GB200": 2.5e15,
    "B200": 2.25e15,
    "B100": 1.75e15,
    "GH200": 989e12,
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H800": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 125e12,  # approximate: AWS's A10 variant, taken as the A10's figure; NVIDIA publishes none
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    # NVIDIA workstation and consumer
    "RTX 6000 Ada": 364e12,
    "RTX A6000": 155e12,
    "RTX 5090": 209e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    # AMD
    "MI300X": 1307e12,
    "MI250X": 383e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, or None when unknown (CPUs included): never 0, so an
    MFU is either right or absent."""
    if not device_name:
        return None
    matches = [
        key
        for key in PEAK_BF16_FLOPS
        if re.search(rf"(?<![a-z0-9]){re.escape(key.lower())}(?![a-z0-9])", device_name.lower())
    ]
    if not matches:
        return None
    return PEAK_BF16_FLOPS[max(matches, key=len)]


def mfu(
    tokens_per_sec: float, flops_per_token: float, world_size: int, device_name: str | None
) -> float | None:
    """Achieved / peak FLOP/s, as a fraction. tokens_per_sec is the global throughput (all ranks),
    so the peak is one device's times world_size. None when the device's peak is unknown."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1")
    peak = peak_flops(device_name)
    if peak is None:
        return None
    return tokens_per_sec * flops_per_token / (peak * world_size)
