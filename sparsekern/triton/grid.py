"""Program-id mappings shared by the Triton conv kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def channel_group_and_pixel_tile(channels, GROUP: tl.constexpr):
    """(channel group, pixel tile) of this program in a 1-D grid of cdiv(channels, GROUP) x
    pixel tiles, channel group fastest: consecutive programs gather the same pixel tile (shared
    in L2), and the pixel tiles are not bound by the 65535 limit of a CUDA grid's second axis
    (a ResNet stem at batch 256 has 3.2M output pixels)."""
    groups = tl.cdiv(channels, GROUP)
    pid = tl.program_id(0)
    return pid % groups, pid // groups
