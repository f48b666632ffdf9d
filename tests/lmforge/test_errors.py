"""The exit-code contract: 2 the user's input or params, 3 a failed expectation, 75 transient; one line."""

from __future__ import annotations

import pytest

from lmforge.errors import DataError, LmforgeError, ParamsError, TransientError, ValidationFailed, run_main


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
