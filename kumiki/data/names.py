"""The site names of a partitioned run, per source (images or text), training sites first.

Below the federation tree (``kumiki.hierarchy`` groups these names) and the entry point (``kumiki.data.prepare``
writes folders under them); it imports only the two sources.
"""

from __future__ import annotations

from kumiki.data import images, text


def partitioned_names(data_cfg) -> list[str]:
    """``data.site_names``, else site-<i>; language data: its languages, roles or chains (``kumiki.data.text``)."""
    if data_cfg.dataset in text.TEXT_DATASETS:
        return text.text_site_names(data_cfg)
    return images.image_site_names(data_cfg)
