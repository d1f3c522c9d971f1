"""Model-free tensor algebra: t-product, t-transpose, t-SVD, tensor CUR. Tensors are ``(..., L, n1, n2)``."""

from .decompositions import TSVD, TensorCUR, t_pinv, t_qr_whiteners, t_svd, tensor_cur, truncated_t_svd
from .tproduct import (
    compute_dtype,
    fourier_slice_weights,
    from_fourier,
    t_identity,
    t_product,
    t_product_fourier,
    t_transpose,
    to_fourier,
)

__all__ = [
    "TSVD",
    "TensorCUR",
    "compute_dtype",
    "fourier_slice_weights",
    "from_fourier",
    "t_identity",
    "t_pinv",
    "t_product",
    "t_qr_whiteners",
    "t_product_fourier",
    "t_svd",
    "t_transpose",
    "tensor_cur",
    "to_fourier",
    "truncated_t_svd",
]
