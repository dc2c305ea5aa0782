"""Simulators of the ThreatQ and TheHive APIs, for tests, benchmarks and ``demo``.

They follow ``reference/threatq-api.md`` and ``reference/thehive-webhooks.md``:
same paths, envelopes, status codes and token flow. They bind 127.0.0.1 only.
"""
