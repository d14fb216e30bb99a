"""Triton kernels, shipped as `cdm_fast.kernels`: one op per module, shared pieces in `common`."""
