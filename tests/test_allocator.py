"""The CPU allocator settings the slimseg command applies at start-up."""

from __future__ import annotations

import sys

import pytest
import torch

from slimseg.allocator import tune_cpu_allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")


def test_settings_apply_on_linux_and_computation_is_unchanged(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    x = torch.randn(2048, 2048)
    before = x @ x
    assert tune_cpu_allocator() is True
    torch.testing.assert_close(x @ x, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_users_own_malloc_settings_win(monkeypatch, name):
    monkeypatch.setenv(name, "131072")
    assert tune_cpu_allocator() is False

