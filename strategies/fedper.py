"""FedPer (Arivazhagan et al., arXiv 1912.00818).

    phi_{t+1} = sum_{k in S_t} (n_k / sum_j n_j) * phi_k

over the base layers only; the personalization layers (``head.*``) are personal by
the split and never travel.
"""

from strategies.fedavg import FedAvg


class FedPer(FedAvg):
    """n-weighted mean of the shared base; the split keeps the heads home."""
