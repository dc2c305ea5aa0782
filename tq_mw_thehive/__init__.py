"""tq-mw-thehive: TheHive webhook events into ThreatQ, durably and in real time."""

__version__ = "0.1.0"
