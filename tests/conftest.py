"""Shared pytest fixtures: tiny heads and data, CPU only, offline."""

from __future__ import annotations

import pytest
import torch

from csrv2.config import HeadConfig
from csrv2.head import SparseHead

# --- fixtures for test_losses / test_schedule / test_head / test_codes / test_step -------------


@pytest.fixture
def make_head():
    """Factory: a seeded SparseHead with random (non-zero) biases so that every term of the head is exercised.

    make_head(input_dim=8, hidden_dim=32, k=2, seed=0, zero_biases=False, **head_config_fields)
    """

    def _make(input_dim: int = 8, hidden_dim: int = 32, k: int = 2, seed: int = 0, zero_biases: bool = False, **fields):
        g = torch.Generator().manual_seed(seed)
        head = SparseHead(HeadConfig(input_dim=input_dim, hidden_dim=hidden_dim, k=k, **fields), generator=g)
        if not zero_biases:
            with torch.no_grad():
                head.pre_bias.copy_(0.1 * torch.randn(input_dim, generator=g))
                head.latent_bias.copy_(0.1 * torch.randn(hidden_dim, generator=g))
        return head

    return _make


@pytest.fixture
def embeddings():
    """Factory: (n, dim) float32 Gaussian embeddings from a fixed seed."""

    def _make(n: int = 6, dim: int = 8, seed: int = 1) -> torch.Tensor:
        return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))

    return _make


# --- end of fixtures for test_losses / test_schedule / test_head / test_codes / test_step -------
