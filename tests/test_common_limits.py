"""Issue 28: sizes without an upper bound are checked against the machine's memory (common/limits.py),
and an allocation that still fails ends in one error line (common/errors.cli_main)."""

from __future__ import annotations

import pytest

from common import limits
from common.errors import CS330Error, cli_main


def test_a_size_beyond_the_largest_memory_is_refused_with_the_estimate_and_the_limit(monkeypatch):
    monkeypatch.setattr(limits, "largest_memory", lambda: 8 * 2**30)
    limits.check_fits(8 * 2**30, "--batch_size 1", "lower --batch_size")  # exactly the limit fits
    with pytest.raises(CS330Error, match=r"^--batch_size 9 needs at least 9 GiB, more than the 8 GiB of memory "
                                         r"this machine has free; lower --batch_size$"):
        limits.check_fits(9 * 2**30, "--batch_size 9", "lower --batch_size")


def test_unknown_memory_refuses_nothing(monkeypatch):
    monkeypatch.setattr(limits, "largest_memory", lambda: None)
    limits.check_fits(1e30, "anything", "nothing")


def test_this_machine_reports_its_memory():
    assert limits.largest_memory() > 2**20


def test_a_failed_allocation_is_one_line_and_exit_2(capsys):
    @cli_main
    def main() -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 1280000000000000 bytes. Error code 12")

    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err == ("error: out of memory (an allocation of 1280000000000000 bytes); lower the batch, model or data "
                   "sizes, or use a device with more memory (the last checkpoint, if any, is kept)\n")


def test_other_runtime_errors_still_raise():
    @cli_main
    def main() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        main()
