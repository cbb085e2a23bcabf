"""Orchestration on top of everything: the ``kumiki`` CLI and the engines that run a config.

It may import ``server/`` and ``client/``; the shared core (``kumiki/``) never imports it
(ARCHITECTURE section 1).
"""
