"""FedProx (Li et al., MLSys 2020, arXiv 1812.06127).

Server: FedAvg's n-weighted mean. Sites minimize F_k(w) + (mu/2)||w - w_t||^2
(``client/methods/fedprox.py``); mu reaches them in every message's config.
"""

from strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """Same aggregation as FedAvg; the proximal term lives on the sites."""
