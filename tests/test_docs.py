"""The README's benchmark figures are copies of bench/RESULTS.md (bench/readme_sync.py), never drifting."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_blocks_equal_their_results_sections():
    from bench.readme_sync import BLOCK, README, synced

    text = README.read_text()
    new, missing = synced(text)
    names = BLOCK.findall(text)
    assert {"aggregation", "wire", "scale", "ray", "eval-share", "overhead", "site-compute"} <= set(names)
    assert not missing and new == text, "README.md differs from bench/RESULTS.md: run python bench/readme_sync.py"


def test_a_drifted_block_is_detected(tmp_path):
    from bench.readme_sync import README, synced

    text = README.read_text().replace("<!-- results:wire:end -->", "an edit by hand\n<!-- results:wire:end -->", 1)
    assert synced(text)[0] != text
