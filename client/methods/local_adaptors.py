"""FLoRAL's local-adaptor baseline on a site: the federated base plus one private adaptor set.

FLoRAL's loop with C = 1 (``client.methods.floral``); the adaptor set is personal by the
split, saved with the site state. There is no zero-shot global path: the base is trained
under every site's own adaptors, and alone it is no model (digits, CNN-S: 29% where FedAvg
has 97%), so ``global`` and ``unseen`` are null, as for FedPer. A new site trains a fresh
adaptor set (and the trivial router) for ``unseen_router_steps`` steps on the frozen base.
"""

from client.methods.floral import FloralObjective


class LocalAdaptorsObjective(FloralObjective):
    """FLoRAL's objective; the split (adaptors personal) makes the difference."""

    has_global = False
