"""Shared test set-up: one torch thread (CI machines have two cores shared by everything)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
