"""twopc: a two-phase-commit coordinator for MySQL/MariaDB XA across regions.

This package holds the coordinator daemon, the client SDK (``coordinator.client``), the ``twopc``
command and what the agent shares with them (errors, txids, values, the generated wire API).
"""
