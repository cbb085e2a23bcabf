"""The CI slice of the conformance matrix (``bench/conformance.py``): every method on the default model.

One cell per registered method, exactly as in the matrix: digits, Dirichlet(0.3), 6 training
sites + 1 unseen, CNN-S with batch norm (the default ``[model]``), each method's own defaults
(its knobs and its paper optimizer), 15 rounds, seed 0 (the matrix averages seeds 0-2). The
same rules: the method learns (personalized >= 0.85, falling loss), a personalization method is
at most 1 point below FedAvg's personalized mean, and a global path is within 5 points of
FedAvg's unless the docs explain the gap (docs/results.md, "Known gaps"; ``EXPLAINED``). About 4
minutes on one core.

Language methods (WorldLM; HierFAVG needs a tree): on the default image config they are refused with a
config error that names ``data.dataset``; their own cell is the language matrix's (synthetic Markov tree, the
default LM, the method's defaults) made small: 3 sites + 1 unseen, 2 rounds of 2 local steps.

Every method whose config validates for Markov text (``lang_methods``: all but DualFed and M-Fed) runs a smoke
cell there: the same small federation on a tiny LM (1 block, d 32, context 32), 2 rounds, a few seconds each. A
config that validates and then crashes at the first forward (issue 25: floral_ensemble; the unseen-site
fine-tunes of local, fedper, fedrep and fedavg_ft, which trained on the classifier's loss) fails here.
"""

from __future__ import annotations

import pytest

from bench.conformance import Cell, lang_methods, language_only, run_cell, verdict
from kumiki.registry import METHODS


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    return run_cell(Cell("digits", "cnn-bn", "fedavg"), tmp_path_factory.mktemp("conformance"))


#: FLoRAL's two baselines run in the bench matrix only (CI time); FLoRAL itself is here.
CI_METHODS = sorted(m for m in set(METHODS) - {"floral_ensemble", "local_adaptors"} if not language_only(m))
LANGUAGE_METHODS = sorted(m for m in METHODS if language_only(m))


@pytest.mark.parametrize("method", CI_METHODS)
def test_method_conforms_on_the_default_model(method, fedavg, tmp_path):
    res = fedavg if method == "fedavg" else run_cell(Cell("digits", "cnn-bn", method), tmp_path)
    assert "error" not in res, res.get("trace")
    v, fails = verdict(res, fedavg)
    assert v != "FAIL", fails


@pytest.mark.parametrize("method", LANGUAGE_METHODS)
def test_language_method_on_the_default_image_config_is_refused_with_the_fix(method, tmp_path):
    for data in ("digits", "pilot"):
        res = run_cell(Cell(data, "cnn-bn", method), tmp_path)
        assert verdict(res, None) == ("refused", []), res
        assert "data.dataset = 'markov'" in res["refused"]
    assert verdict({**res, "refused": "invalid config:\n  - something else"}, None)[0] == "FAIL"  # no fix named


def test_worldlm_learns_on_the_default_language_model(tmp_path):
    res = run_cell(Cell("markov", "lm", "worldlm", rounds=2, quick=True), tmp_path)
    assert "error" not in res, res.get("trace")
    assert verdict(res, None) == ("pass", []), res
    assert res["personalized"] < 256 and res["unseen_adapted"] < res["unseen"]  # below uniform; adapts


@pytest.mark.parametrize("method", lang_methods(sorted(METHODS)))
def test_every_method_that_validates_on_language_data_runs_on_it(method, tmp_path):
    res = run_cell(Cell("markov", "lm", method, rounds=2, tiny=True), tmp_path)
    assert "error" not in res, res.get("trace")
    assert verdict(res, None) == ("pass", []), res  # no rejected reply, perplexity and train loss fall
    if res["unseen_adapted"] is not None:
        assert res["unseen_adapted"] < 256  # a new site's adaptation ran on the language loss


def test_language_cells_hold_every_method_that_validates_on_language_data():
    assert set(lang_methods(METHODS)) == set(METHODS) - {"dualfed", "mfed"}
