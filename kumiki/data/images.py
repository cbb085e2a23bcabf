"""Image sites for pilots and simulations: one pooled image dataset partitioned into site folders.

The pool (``digits`` or ``fashion-mnist``, ``kumiki.data.sources``) is split over the sites
(``kumiki.data.partition``), each site's share gets its camera/domain (``kumiki.data.domains``), its cluster
shift and its task's targets (``kumiki.data.targets``), and is written in the site folder format
(``kumiki.data.sites``). ``kumiki.data.prepare`` is the entry point that picks this source or the text one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kumiki.data import domains, partition, sources, targets
from kumiki.data.sites import SiteDataError, site_name, write_site


def image_site_names(data_cfg) -> list[str]:
    """The names of an image run's sites, training sites first: ``data.site_names``, else site-<i>."""
    return list(data_cfg.site_names) or [site_name(i) for i in range(data_cfg.sites + data_cfg.unseen_sites)]


def pool(data_cfg) -> tuple[np.ndarray, np.ndarray]:
    if data_cfg.dataset == "digits":
        return sources.load_digits()
    if data_cfg.dataset == "fashion-mnist":
        return sources.load_fashion_mnist(data_cfg.dataset_dir(), "train")
    raise SiteDataError("site-folders data is already split per site; nothing to materialize")


def materialize_images(cfg, root: str | Path) -> list[Path]:
    """Partition the pooled image dataset into ``sites + unseen_sites`` folders under ``root``."""
    data = cfg.data
    root = Path(root)
    x, y = pool(data)
    seed = cfg.run.seed if data.partition_seed is None else data.partition_seed
    rng = np.random.default_rng(seed)
    n_total = data.sites + data.unseen_sites
    names = image_site_names(data)
    parts = partition.partition(y, n_total, data.partition, rng)
    shape, num_classes = list(x.shape[1:]), int(y.max()) + 1
    tasks = cfg.site_tasks() or ["classification"] * n_total
    groups = cfg.method.site_groups(n_total)
    out = []
    for i, idx in enumerate(parts):
        idx = rng.permutation(idx)
        cap = data.samples_per_site[i] if isinstance(data.samples_per_site, list) else data.samples_per_site
        if cap is not None:
            idx = idx[:cap]
        domain = data.domains[i % len(data.domains)] if data.domains else "identity"
        xs = domains.apply(x[idx], domain, rng)
        ys = y[idx]
        xs, ys, cluster_meta = _cluster_shift(data.partition, i, xs, ys, num_classes, rng)
        # a generator of the site's own (the denoising noise): every site's examples stay those of any method's run
        xs, ys = targets.derive(tasks[i], xs, ys, np.random.default_rng([seed, 9, i]))
        n_test = max(1, int(round(len(idx) * data.test_fraction)))
        role = "train" if i < data.sites else "unseen"
        meta = {
            "name": names[i], "role": role, "domain": domain, "task": tasks[i],
            "derived": domain != "identity" or cluster_meta.get("cluster", 0) != 0 or targets.is_derived(tasks[i]),
            "num_classes": num_classes, "input_shape": shape, "source": data.dataset, **cluster_meta,
        }
        if groups:
            meta["group"] = groups[i]
        out.append(write_site(root / names[i], meta, xs[n_test:], ys[n_test:], xs[:n_test], ys[:n_test]))
    return out


def _cluster_shift(spec, i: int, xs: np.ndarray, ys: np.ndarray, num_classes: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Site i's cluster transform (``partition.kind = "clusters"``); other kinds pass the data through.

    The cluster goes only into the site's own site.json (for diagnostics): clustered methods must find
    the clusters themselves, so nothing sent to the server may carry it."""
    if spec.kind != "clusters":
        return xs, ys, {}
    c = partition.cluster_of(i, spec.clusters)
    if spec.cluster_transform == "label_shift":
        ys = partition.shift_labels(ys, c, num_classes)
    else:
        xs = domains.apply(xs, partition.cluster_rotation(c, spec.clusters), rng)
    return xs, ys, {"cluster": c, "cluster_transform": spec.cluster_transform}
