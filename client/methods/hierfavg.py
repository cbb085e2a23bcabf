"""HierFAVG site objective: WorldLM's local training (tau steps, the same token budget), no personal part.

The model a site holds is its sub-federation's M_g: that is both its personalized and its global path; an
unseen site adapts with one round of local steps, as WorldLM's does.
"""

from client.methods.worldlm import LMObjective


class HierFAVGObjective(LMObjective):
    pass
