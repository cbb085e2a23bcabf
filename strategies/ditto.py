"""Ditto (Li et al., ICML 2021, arXiv 2012.04221).

Server: FedAvg on the global track, w_{t+1} = sum_k (n_k / sum_j n_j) * w_k. Each
site's personal model v_k lives only in its state store and never travels.
"""

from strategies.fedavg import FedAvg


class Ditto(FedAvg):
    """FedAvg on the global models the sites upload."""
