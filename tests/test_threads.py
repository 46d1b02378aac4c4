"""diffattr.threads: the cores a command uses when other processes keep some busy; and the
estimate a long piece of work announces from its first batch (parallel.ProgressBar)."""

from __future__ import annotations

import pytest
import torch

import diffattr.parallel as parallel
from diffattr import threads
from diffattr.errors import ConfigError


def _fake_stat(monkeypatch, samples):
    it = iter(samples)
    monkeypatch.delenv("DIFFATTR_THREADS", raising=False)  # the tests' own pin (conftest)
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(it))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)


def test_idle_machine_uses_every_core(monkeypatch):
    _fake_stat(monkeypatch, [(100, 1000), (102, 1200)])  # 1% busy
    assert threads.choose_threads() == 2


def test_a_busy_process_takes_its_cores(monkeypatch):
    _fake_stat(monkeypatch, [(100, 1000), (300, 1200)])  # both cores busy
    assert threads.choose_threads() == 1  # never fewer than one
    _fake_stat(monkeypatch, [(100, 1000), (200, 1200)])  # one core's worth busy
    assert threads.choose_threads() == 1


def test_requested_threads_win(monkeypatch):
    _fake_stat(monkeypatch, [(100, 1000), (300, 1200)])
    assert threads.choose_threads(2) == 2
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_environment_fixes_the_count(monkeypatch):
    _fake_stat(monkeypatch, [(100, 1000), (102, 1200)])  # idle: auto would give 2
    monkeypatch.setenv("DIFFATTR_THREADS", "1")
    assert threads.choose_threads() == 1
    assert threads.choose_threads(2) == 2  # --threads still wins
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("DIFFATTR_THREADS", bad)
        with pytest.raises(ConfigError, match="DIFFATTR_THREADS"):
            threads.choose_threads()
    monkeypatch.setenv("DIFFATTR_THREADS", "")
    assert threads.choose_threads() == 2  # empty: as if unset


def test_unreadable_proc_stat_counts_nothing_busy(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_times", lambda: None)
    assert threads.busy_cores() == 0.0


def test_real_proc_stat_reads():
    assert 0.0 <= threads.busy_cores(0.01) <= (threads.os.cpu_count() or 1)


def test_long_work_announces_its_estimate(monkeypatch, capsys):
    monkeypatch.setattr(parallel, "ESTIMATE_AFTER", 60.0)
    with parallel.ProgressBar(total=100, desc="featurize", file=None) as bar:
        bar.start_t -= 30  # the first 10 of 100 took 30 s: 300 s in all
        bar.update(10)
        bar.update(10)  # said once
    err = capsys.readouterr().err
    assert err.count("note: featurize: about 5 min in all") == 1
    with parallel.ProgressBar(total=100, desc="quick") as bar:
        bar.update(50)  # instant: no note
    assert "note" not in capsys.readouterr().err
