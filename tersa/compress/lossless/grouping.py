"""Contexts of a symbol matrix: each row has a class, each column has a class, and a symbol's
context is (row class, column class).

The symbols of context ``a · n_cols + b`` are those of the rows of class ``a`` and the columns of
class ``b``, in row-major order; contexts follow each other in that order. Each context has its own
frequency row, so a tensor whose scale varies by row or column (embeddings, outlier input channels)
is coded as a mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Grouping:
    """Row classes [R] and column classes [C] (uint8, None: one class) of an [R, C] matrix."""

    rows: np.ndarray | None
    cols: np.ndarray | None
    n_rows: int = 1
    n_cols: int = 1

    @property
    def contexts(self) -> int:
        return self.n_rows * self.n_cols

    def _order(
        self, classes: np.ndarray | None, n: int, size: int
    ) -> tuple[np.ndarray | None, list[int]]:
        """(stable order by class or None, class boundaries [n + 1] in that order)."""
        if classes is None:
            return None, [0, size]
        order = np.argsort(classes, kind="stable")
        return order, np.searchsorted(classes[order], np.arange(n + 1)).tolist()

    def sizes(self, shape: tuple[int, int]) -> list[int]:
        """Symbols per context of an ``shape`` = [R, C] matrix."""
        _, rb = self._order(self.rows, self.n_rows, shape[0])
        _, cb = self._order(self.cols, self.n_cols, shape[1])
        return [
            (rb[a + 1] - rb[a]) * (cb[b + 1] - cb[b])
            for a in range(len(rb) - 1)
            for b in range(len(cb) - 1)
        ]

    def split(self, matrix: np.ndarray) -> list[np.ndarray]:
        """The flat symbols of each context of ``matrix`` [R, C]."""
        rows, rb = self._order(self.rows, self.n_rows, matrix.shape[0])
        cols, cb = self._order(self.cols, self.n_cols, matrix.shape[1])
        permuted = matrix if rows is None else np.take(matrix, rows, axis=0)
        permuted = permuted if cols is None else np.take(permuted, cols, axis=1)
        return [
            permuted[rb[a] : rb[a + 1], cb[b] : cb[b + 1]].reshape(-1)
            for a in range(len(rb) - 1)
            for b in range(len(cb) - 1)
        ]

    def join(self, parts: list[np.ndarray], shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """The [R, C] matrix whose contexts hold ``parts`` (inverse of :meth:`split`)."""
        rows, rb = self._order(self.rows, self.n_rows, shape[0])
        cols, cb = self._order(self.cols, self.n_cols, shape[1])
        if len(parts) == 1:
            permuted = parts[0].astype(dtype, copy=False).reshape(shape)
        else:
            permuted = np.empty(shape, dtype)
            blocks = ((a, b) for a in range(len(rb) - 1) for b in range(len(cb) - 1))
            for (a, b), part in zip(blocks, parts, strict=True):
                permuted[rb[a] : rb[a + 1], cb[b] : cb[b + 1]] = part.reshape(
                    rb[a + 1] - rb[a], cb[b + 1] - cb[b]
                )
        if cols is not None:
            permuted = np.take(permuted, np.argsort(cols), axis=1)
        if rows is not None:
            permuted = np.take(permuted, np.argsort(rows), axis=0)
        return permuted
