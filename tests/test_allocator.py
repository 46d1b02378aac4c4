import sys

import pytest

from diffattr import allocator


class FakeLibc:
    """A C library whose ``mallopt`` records its calls and answers ``accept``."""

    def __init__(self, accept: int) -> None:
        self.calls: list[tuple[int, int]] = []
        libc = self

        class Mallopt:
            argtypes = restype = None

            def __call__(self, param: int, value: int) -> int:
                libc.calls.append((param, value))
                return accept

        self.mallopt = Mallopt()


@pytest.fixture
def fresh(monkeypatch):
    """The allocator module as if nothing had tuned this process yet, on a glibc Linux."""
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv(allocator.KEEP_FREED_MEMORY_ENV, raising=False)
    return allocator


def test_thresholds_set_once_per_process(fresh, monkeypatch):
    libc = FakeLibc(accept=1)
    monkeypatch.setattr(fresh, "_glibc", lambda: libc)
    assert fresh.keep_freed_memory() is True
    assert fresh.keep_freed_memory() is True
    assert libc.calls == [(-3, fresh.MMAP_THRESHOLD), (-1, fresh.TRIM_THRESHOLD)]


@pytest.mark.parametrize("value", ["0", "off"])
def test_opt_out_leaves_the_allocator_alone(fresh, monkeypatch, value):
    libc = FakeLibc(accept=1)
    monkeypatch.setattr(fresh, "_glibc", lambda: libc)
    monkeypatch.setenv(fresh.KEEP_FREED_MEMORY_ENV, value)
    assert fresh.keep_freed_memory() is False
    assert libc.calls == []


def test_refused_or_missing_allocator_reported(fresh, monkeypatch):
    monkeypatch.setattr(fresh, "_glibc", lambda: FakeLibc(accept=0))
    assert fresh.keep_freed_memory() is False
    monkeypatch.setattr(fresh, "_applied", None)
    monkeypatch.setattr(fresh, "_glibc", lambda: None)  # musl, or no C library found
    assert fresh.keep_freed_memory() is False
    monkeypatch.setattr(fresh, "_applied", None)
    monkeypatch.setattr(fresh.sys, "platform", "darwin")
    monkeypatch.setattr(fresh, "_glibc", lambda: pytest.fail("looked for glibc off Linux"))
    assert fresh.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_glibc_found_on_this_linux():
    libc = allocator._glibc()
    if libc is None:
        pytest.skip("not glibc (e.g. musl)")
    assert hasattr(libc, "mallopt")
