"""Pallas kernels for jaxllm. Depends on jax only: each family has TPU and GPU variants."""
