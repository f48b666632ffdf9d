"""The exit-code contract: 2 the user's input or params, 3 a failed expectation, 75 transient; one line."""

from __future__ import annotations

import pytest

from lmforge.errors import (
    DataError,
    LmforgeError,
    ParamsError,
    TransientError,
    ValidationFailed,
    is_retried,
    run_main,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [(ParamsError("params.yaml: x: bad"), 2), (DataError("a.csv: bad"), 2), (ValidationFailed("suite x"), 3),
     (TransientError("server down"), 75)],
)  # fmt: skip
def test_each_error_exits_with_its_code_in_one_line(error: LmforgeError, code: int, capsys: pytest.CaptureFixture):
    def main() -> None:
        raise error

    with pytest.raises(SystemExit) as exited:
        run_main(main)
    assert exited.value.code == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_a_message_over_several_lines_is_printed_on_one(capsys: pytest.CaptureFixture):
    def main() -> None:
        raise DataError("data/raw/x/train.parquet:\n  not valid\tParquet")

    with pytest.raises(SystemExit):
        run_main(main)
    assert capsys.readouterr().err == "error: data/raw/x/train.parquet: not valid Parquet\n"


def test_anything_else_is_a_bug_and_propagates_with_its_traceback():
    def main() -> None:
        raise KeyError("oops")

    with pytest.raises(KeyError):
        run_main(main)


@pytest.mark.parametrize(
    ("code", "retried"),
    [(75, True), (-9, True), (-15, True), (137, True), (143, True),  # transient, or killed by a signal
     (2, False), (3, False),  # the user's to fix
     (1, False), (255, False), (0, False)],  # a bug (a traceback), or no failure at all
)  # fmt: skip
def test_only_transient_failures_and_deaths_by_signal_are_retried(code: int, retried: bool):
    assert is_retried(code) is retried


@pytest.mark.parametrize(
    ("codes", "kind", "code"),
    [([75, -9], TransientError, 75), ([2, -9], LmforgeError, 2), ([3], LmforgeError, 2), ([1], RuntimeError, None)],
)  # fmt: skip
def test_failed_trial_workers_fail_the_stage_by_the_contract(codes: list[int], kind: type, code: int | None):
    from flows.trials import workers_failed

    error = workers_failed(codes, "trial workers")
    assert type(error) is kind and getattr(error, "exit_code", None) == code
