"""A flow runs with the params file the stages of dvc.yaml read: another one is refused, not reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows.pipeline import stage_params
from lmforge.errors import LmforgeError
from lmforge.params import Params
from tests.conftest import REPO


def test_the_stages_params_file_is_the_flows():
    assert stage_params("params.yaml", REPO) == Params()
    assert stage_params("./params.yaml", REPO) == Params()


def test_another_params_file_is_refused_naming_the_one_the_stages_read(tmp_path: Path):
    shutil.copy(REPO / "params.yaml", tmp_path / "other.yaml")
    with pytest.raises(LmforgeError) as refused:
        stage_params(str(tmp_path / "other.yaml"), REPO)
    assert str(refused.value) == (f"params_path: {tmp_path / 'other.yaml'}: the stages of dvc.yaml read params.yaml; "
                                  "put these params there (`lmforge params use`, or copy the file)")  # fmt: skip
