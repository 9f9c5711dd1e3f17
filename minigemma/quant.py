"""Weights kept in a quantized storage format, dequantized a block of rows at a time.

A quantized checkpoint (gemma_pytorch's int8 + per-row scaler, GGUF's Q8_0, Q4_K, ...) stays in
memory as it is stored. model.py widens a few rows at a time into float32, exactly as the format
defines its values, and never builds a float copy of the whole matrix.

Every format is a subclass of `Quantized` that says how to turn stored rows into float32:

    w.shape              (rows, cols): the logical [out, in] shape, as a torch Linear weight
    w.dequantize(rows)   float32 [n, cols] for a slice or an index array of rows
    w[start:stop]        the same weights restricted to those rows (a view, nothing is copied)
"""

import numpy as np

from .errors import CheckpointError, check_memory


class Quantized:
    """A [rows, cols] weight matrix in quantized storage. Subclasses set `kind`, `shape`, `nbytes`
    and define `_dequantize(rows)` for a sorted-or-not integer array of row indices."""

    kind = "quantized"
    ndim = 2

    def __init__(self, shape, nbytes):
        self.shape = tuple(int(n) for n in shape)
        self.nbytes = int(nbytes)

    @property
    def size(self):
        return self.shape[0] * self.shape[1]

    @property
    def dtype(self):
        """Quantized weights have no NumPy dtype; `kind` names the format (e.g. "int8+scale")."""
        return self.kind

    def __len__(self):
        return self.shape[0]

    def dequantize(self, rows=slice(None)):
        """float32 [n, cols]: the stored rows (a slice or an integer array), dequantized."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row index out of range for a {self.kind} weight of shape {self.shape}")
        check_memory(4 * len(rows) * self.shape[1],
                     f"dequantizing {len(rows)} rows of a {self.kind} weight {self.shape}")
        return self._dequantize(rows)

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError(f"a {self.kind} weight can be sliced by a range of rows only; "
                            f"use .dequantize(rows) for values")
        start, stop, _ = rows.indices(self.shape[0])
        return self._rows(start, max(start, stop))

    def _rows(self, start, stop):
        raise NotImplementedError

    def _dequantize(self, rows):
        raise NotImplementedError


class Int8Rows(Quantized):
    """gemma_pytorch's int8 weights: w[r, c] = int8[r, c] * scaler[r], in float32.

    gemma_pytorch computes `weight * weight_scaler.unsqueeze(-1)` and then the matmul; here the
    product is formed in float32 a block of rows at a time, which gives the same numbers.
    """

    kind = "int8+scale"

    def __init__(self, weight, scaler):
        weight, scaler = np.asarray(weight), np.asarray(scaler)
        if weight.dtype != np.int8 or weight.ndim != 2:
            raise CheckpointError(f"int8 weight must be a 2-D int8 array, got {weight.dtype} "
                                  f"{weight.shape}")
        if scaler.shape != (weight.shape[0],):
            raise CheckpointError(f"weight_scaler has shape {scaler.shape}, expected "
                                  f"({weight.shape[0]},) (one scale per output row)")
        super().__init__(weight.shape, weight.nbytes + scaler.nbytes)
        self.weight, self.scaler = weight, scaler

    def _rows(self, start, stop):
        return Int8Rows(self.weight[start:stop], self.scaler[start:stop])

    def _dequantize(self, rows):
        scale = self.scaler[rows].astype(np.float32)[:, None]
        return self.weight[rows].astype(np.float32) * scale


class GGMLBlocks(Quantized):
    """A GGUF tensor in one of ggml's block formats (Q8_0, Q4_0, Q4_K, Q6_K, ...), kept as stored.

    raw: uint8 [rows, bytes per row]. Each row of the [out, in] matrix is a run of blocks of 32
    weights (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) or 256 weights (the K-quants Q2_K..Q6_K), each block
    holding its small integers and the float16 scales they are multiplied by. The values are what
    the `gguf` package's NumPy dequantizers (llama.cpp's own Python package) say they are: that
    package defines "exact" here.
    """

    def __init__(self, raw, ggml_type):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        ggml_type = GGMLQuantizationType(ggml_type)
        weights_per_block, bytes_per_block = GGML_QUANT_SIZES[ggml_type]
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % bytes_per_block:
            raise CheckpointError(f"{ggml_type.name} weight must be a 2-D uint8 array of whole "
                                  f"{bytes_per_block}-byte blocks per row, got {raw.dtype} "
                                  f"{raw.shape}")
        cols = raw.shape[1] // bytes_per_block * weights_per_block
        super().__init__((raw.shape[0], cols), raw.nbytes)
        self.raw, self.ggml_type = raw, ggml_type
        self.kind = f"GGUF {ggml_type.name}"

    def _rows(self, start, stop):
        return GGMLBlocks(self.raw[start:stop], self.ggml_type)

    def _dequantize(self, rows):
        from gguf.quants import dequantize

        return dequantize(self.raw[rows], self.ggml_type).astype(np.float32, copy=False)
