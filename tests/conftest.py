"""Shared test set-up: one torch thread (CI machines have two cores shared by everything)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ipython_shell():
    """The one IPython shell of the test session, with nbtrouble loaded.

    ``globalipapp.get_ipython()`` returns the shell only on its first call, so every magic test
    module takes it from here.
    """
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    start_ipython()
    shell = get_ipython()
    shell.run_line_magic("load_ext", "nbtrouble")
    return shell
