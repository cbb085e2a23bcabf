"""FedAvg + local fine-tuning (Wang et al. 2019, arXiv 1910.10252).

The server is FedAvg; the global trajectory is identical to FedAvg's. Sites
fine-tune a private copy only for personalized evaluation.
"""

from strategies.fedavg import FedAvg


class FedAvgFT(FedAvg):
    """FedAvg on the server; fine-tuning happens only on the sites."""
