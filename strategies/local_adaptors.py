"""FLoRAL's local-adaptor baseline (spec ``floral.md`` section 10, ``floral_locallora``).

    W_{t+1} = sum_{k in S_t} (n_k / sum_j n_j) * W_k

over the base only: each site's single adaptor set (and its trivial router) is personal by
the split and never travels, unlike the official code, which uploads it and overwrites it.
"""

from strategies.fedavg import FedAvg


class LocalAdaptors(FedAvg):
    """n-weighted mean of the shared base; the split keeps every adaptor home."""
