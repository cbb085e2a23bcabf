"""Local-only: the whole model is personal; the site trains alone, nothing travels."""

from client.methods.base import SiteObjective


class LocalObjective(SiteObjective):
    has_global = False
