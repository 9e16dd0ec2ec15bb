"""Precision of stored weights: bytes per parameter of a format, group scales and packing included.

A precision is a property of what is stored and moved (an expert's master copy, the dense part on the
GPU): the cost model copies `bytes_per_param x params` and reads as much per visit. Formats:

- `bf16`, `fp16`: 2 bytes.
- `int8`: 1 byte + one fp16 scale per output channel of 4096-wide rows (bitsandbytes LLM.int8 /
  per-channel weight-only int8; ~1.004 bytes).
- `int4`: 4 bits + one fp16 scale and one fp16 zero per group of 128 (GPTQ / AWQ default group; 4.25 bits).
- `hqqB` (B = 2, 3, 4, 8), HQQ as mixtral-offloading stores experts (mobiusml/hqq at 37502be, the commit
  mixtral-offloading pins; `Quantizer.quantize`, `BitPack`, `hqq_base_quant_config`): B-bit codes per
  parameter (3-bit packs 10 codes per int32 row after mixtral-offloading's `repack`: 3.2 bits), one
  scale and one zero per group of `g` parameters, each quantised to 8 bits (`quant_scale`,
  `quant_zero`), and per `s` scales one fp16 scale and one fp16 zero of the scales (`scale_quant_params`
  group 128 by default); the zeros are quantised with one scale for the whole tensor (negligible).
  Bits per parameter = B' + 8/g + 8/g + 32/(g*s). Named presets: `hqq2` = 2-bit g16 s128 (mixtral-
  offloading's experts: 3.016 bits), `hqq3` = 3-bit g64 s128 (3.454 bits), `hqq4` = 4-bit g64 s256
  (mixtral-offloading's attention config: 4.252 bits), `hqq8` = 8-bit g64 s128; any other grouping is
  written `hqq{B}-g{G}-s{S}` (e.g. `hqq4-g64-s128`).

Every format also names the kernel family that computes on it (`fp16`, `int8`, `int4`, `hqq`): the
software library (configs/hardware/library/software.yaml) gives each family's share of the GPU's
memory bandwidth at decode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HQQ_PACKED_BITS = {
    2: 2.0,
    3: 3.2,
    4: 4.0,
    8: 8.0,
}  # BitPack: 2bit_u8, 3bit_32 (10 per int32), 4bit_u8, 8bit_u8
HQQ_PRESETS = {2: (16, 128), 3: (64, 128), 4: (64, 256), 8: (64, 128)}  # bits -> (group, scale group)
CHANNEL_WIDTH = 4096  # rows of a per-channel int8 scale (Mixtral's hidden size; the scale is ~0.1% anyway)


class PrecisionError(ValueError):
    """An unknown or malformed precision; the message lists the known ones."""


@dataclass(frozen=True)
class Precision:
    """A stored weight format: its name, bits per parameter (overheads included) and kernel family."""

    name: str
    bits_per_param: float
    kernel: str  # fp16 | int8 | int4 | hqq
    source: str

    @property
    def bytes_per_param(self) -> float:
        return self.bits_per_param / 8.0

    def nbytes(self, params: int) -> int:
        """Bytes of `params` parameters stored in this format (whole bytes, rounded up)."""
        return int(-(-params * self.bits_per_param // 8))


def hqq_bits(bits: int, group: int, scale_group: int) -> float:
    """Bits per parameter of an HQQ tensor with 8-bit quantised scales and zeros (see the module doc)."""
    if bits not in HQQ_PACKED_BITS:
        raise PrecisionError(f"HQQ supports {sorted(HQQ_PACKED_BITS)} bits, got {bits}")
    if group < 8 or group % 8 or scale_group < 1:
        raise PrecisionError(f"HQQ group {group} must be a multiple of 8 and scale group {scale_group} >= 1")
    return HQQ_PACKED_BITS[bits] + 8.0 / group + 8.0 / group + 32.0 / (group * scale_group)


_FIXED = {
    "bf16": Precision("bf16", 16.0, "fp16", "format: bfloat16, 2 bytes"),
    "fp16": Precision("fp16", 16.0, "fp16", "format: IEEE half, 2 bytes"),
    "int8": Precision(
        "int8",
        8.0 + 16.0 / CHANNEL_WIDTH,
        "int8",
        "format: int8 weights + one fp16 scale per output channel (LLM.int8 / weight-only int8)",
    ),
    "int4": Precision(
        "int4",
        4.0 + 32.0 / 128,
        "int4",
        "format: 4-bit weights + fp16 scale and zero per group of 128 (GPTQ/AWQ default group)",
    ),
}
_HQQ = re.compile(r"^hqq(\d+)(?:-g(\d+)-s(\d+))?$")


def precision_of(name: str) -> Precision:
    """The `Precision` a name denotes (see the module doc); unknown names list the known ones."""
    if not isinstance(name, str):
        raise PrecisionError(f"precision must be a name, got {name!r}; known: {known()}")
    if name in _FIXED:
        return _FIXED[name]
    m = _HQQ.match(name)
    if not m:
        raise PrecisionError(f"unknown precision {name!r}; known: {known()}")
    bits = int(m.group(1))
    if bits not in HQQ_PRESETS:
        raise PrecisionError(f"unknown precision {name!r}: HQQ supports {sorted(HQQ_PRESETS)} bits")
    group, sgroup = (int(m.group(2)), int(m.group(3))) if m.group(2) else HQQ_PRESETS[bits]
    return Precision(
        name,
        hqq_bits(bits, group, sgroup),
        "hqq",
        f"code: mobiusml/hqq@37502be (as mixtral-offloading packs it): {bits}-bit codes, 8-bit scale and zero "
        f"per group of {group}, fp16 scale/zero per {sgroup} scales",
    )


def known() -> list[str]:
    return [*_FIXED, *(f"hqq{b}" for b in HQQ_PRESETS), "hqq{B}-g{G}-s{S}"]
