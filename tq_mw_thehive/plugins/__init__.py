"""Bundled IOC-enrichment plugins, one small module each (the registry loads them by name)."""
