"""The CI slice of the conformance matrix (``bench/conformance.py``): every method on the default model.

One cell per registered method, exactly as in the matrix: digits, Dirichlet(0.3), 6 training
sites + 1 unseen, CNN-S with batch norm (the default ``[model]``), each method's own defaults
(its knobs and its paper optimizer), 15 rounds, seed 0 (the matrix averages seeds 0-2). The
same rules: the method learns (personalized >= 0.85, falling loss), a personalization method is
at most 1 point below FedAvg's personalized mean, and a global path is within 5 points of
FedAvg's unless the README explains the gap (``EXPLAINED``). About 4 minutes on one core.
"""

from __future__ import annotations

import pytest

from bench.conformance import Cell, run_cell, verdict
from kumiki.registry import METHODS


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    return run_cell(Cell("digits", "cnn-bn", "fedavg"), tmp_path_factory.mktemp("conformance"))


#: FLoRAL's two baselines run in the bench matrix only (CI time); FLoRAL itself is here.
CI_METHODS = sorted(set(METHODS) - {"floral_ensemble", "local_adaptors"})


@pytest.mark.parametrize("method", CI_METHODS)
def test_method_conforms_on_the_default_model(method, fedavg, tmp_path):
    res = fedavg if method == "fedavg" else run_cell(Cell("digits", "cnn-bn", method), tmp_path)
    assert "error" not in res, res.get("trace")
    v, fails = verdict(res, fedavg)
    assert v != "FAIL", fails
