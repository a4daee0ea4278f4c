"""Element types of checkpoint tensors, without importing torch.

`apply`, lossless `diff` and `inspect` move raw bits and never compute with tensors, so they run
on NumPy alone and skip torch's import (~2 s per process, as long as applying 2 GiB here). A
`DType` knows its safetensors code, its width, whether dstcli may patch it, the same-width
integer view that patches XOR, and how to widen its bits to float64 for statistics; `.torch`
gives the torch dtype where training needs one (importing torch then).

    BY_CODE["BF16"].itemsize           # 2
    BY_NAME["bfloat16"].to_float64(bits_int16)
    bits_view(torch_tensor)            # the flat integer view of a torch tensor (imports torch)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # same-width integer views
INT_VIEW_NP = {w: getattr(np, n) for w, n in INT_NAMES.items()}


def _e4m3fn_table() -> np.ndarray:
    """float64 value of each float8_e4m3fn bit pattern: bias 7, no infinities, S.1111.111 is NaN."""
    b = np.arange(256)
    e, m = (b >> 3) & 15, (b & 7) / 8.0
    v = np.where(e == 0, m * 2.0 ** -6, (1 + m) * np.exp2(e - 7.0))
    v = np.where(b >> 7, -v, v)
    v[(b & 0x7F) == 0x7F] = np.nan
    return v


@dataclass(frozen=True)
class DType:
    name: str  # torch's name, as patch headers spell it: "bfloat16"
    code: str  # the safetensors dtype: "BF16"
    itemsize: int
    is_floating_point: bool  # only floating-point tensors are patched

    def __str__(self) -> str:
        return self.name

    @property
    def ints(self) -> type:
        """The NumPy integer type of the same width (what patches XOR)."""
        return INT_VIEW_NP[self.itemsize]

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)

    def to_float64(self, bits: np.ndarray) -> np.ndarray:
        """Values of floating-point entries given as their integer bit patterns (any shape)."""
        with np.errstate(invalid="ignore"):  # signalling NaNs stay NaN
            return self._widen(bits.view(f"u{self.itemsize}"))

    def _widen(self, u: np.ndarray) -> np.ndarray:
        if self.name == "bfloat16":
            return (u.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if self.name == "float8_e5m2":  # the top byte of a float16
            return (u.astype(np.uint16) << 8).view(np.float16).astype(np.float64)
        if self.name == "float8_e4m3fn":
            return _E4M3FN[u]
        if self.name in ("float16", "float32", "float64"):
            return u.view(f"f{self.itemsize}").astype(np.float64)
        raise TypeError(f"{self.name} is not a floating-point type")


_E4M3FN = _e4m3fn_table()
_ALL = [
    DType("float64", "F64", 8, True), DType("float32", "F32", 4, True), DType("float16", "F16", 2, True),
    DType("bfloat16", "BF16", 2, True), DType("float8_e4m3fn", "F8_E4M3", 1, True),
    DType("float8_e5m2", "F8_E5M2", 1, True),
    DType("int64", "I64", 8, False), DType("int32", "I32", 4, False), DType("int16", "I16", 2, False),
    DType("int8", "I8", 1, False), DType("uint8", "U8", 1, False), DType("uint16", "U16", 2, False),
    DType("uint32", "U32", 4, False), DType("uint64", "U64", 8, False), DType("bool", "BOOL", 1, False),
]
BY_CODE = {d.code: d for d in _ALL}
BY_NAME = {d.name: d for d in _ALL}
FLOATS = {d.name: d for d in _ALL if d.is_floating_point}


def dtype_name(dtype) -> str:
    """"float32" for torch.float32 and for DType float32 alike."""
    return str(dtype).removeprefix("torch.")


def of_torch(dtype) -> DType:
    """The DType of a torch dtype."""
    return BY_NAME[dtype_name(dtype)]


def bits_view(t):
    """The flat integer view of a torch tensor's bit patterns (same width, no copy when contiguous)."""
    import torch

    return t.contiguous().reshape(-1).view(getattr(torch, INT_NAMES[t.element_size()]))
