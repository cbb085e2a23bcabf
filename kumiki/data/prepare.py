"""Data preparation, the one entry point: a run's site names and site folders, whatever the source.

Layers, each importing only those below it::

    prepare              this module: materialize, partitioned_names, site_folders
    kumiki.hierarchy     the federation tree (groups over the site names)
    names                site names per source
    images | text        one module per source: pooled images partitioned, or text corpora per site
    sites                the site folder format (load, check, write); no source

A deployment's sites never come here: each reads its own folder with ``kumiki.data.sites.load_site``.
"""

from __future__ import annotations

from pathlib import Path

from kumiki import hierarchy
from kumiki.data import images, text
from kumiki.data.names import partitioned_names
from kumiki.data.sites import site_folders

__all__ = ["materialize", "partitioned_names", "site_folders"]


def materialize(cfg, root: str | Path) -> list[Path]:
    """Write the run's ``sites + unseen_sites`` site folders under ``root`` (seeded: the same config writes the
    same folders), from its image pool or its text corpus; language sites are grouped by the federation tree."""
    if cfg.data.dataset in text.TEXT_DATASETS:
        tree = hierarchy.resolve(cfg)
        groups = {s: (tree.group_of(s) if tree else None) or "" for s in text.text_site_names(cfg.data)}
        return text.materialize_text(cfg, root, groups)
    return images.materialize_images(cfg, root)
