"""Block-sparse Pallas kernels (matmul and attention) for GPU, TPU and CPU, with autodiff."""

from pallas_kernels._platform import BACKENDS, default_backend, resolve_backend
from pallas_kernels.matmul import BlockSparseMatrix, bsr_from_dense, bsr_matmul, bsr_to_dense

__all__ = ["BACKENDS", "default_backend", "resolve_backend"]
__all__ += ["BlockSparseMatrix", "bsr_from_dense", "bsr_matmul", "bsr_to_dense"]
