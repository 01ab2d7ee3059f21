"""Maintenance scripts run as ``python -m rlhf_cli.tools.NAME`` (not part of the ``rlhf`` command)."""
