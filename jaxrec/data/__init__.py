"""Data: the batch format, the synthetic click stream, readers for real formats."""

from jaxrec.data.batch import Batch, SparseLayout
