"""Bundled IOC-enrichment plugins, one small module each.

Installed as ``tq_mw_thehive.plugins`` (see ``package_dir`` in setup.cfg) so that a
plain ``pip install .`` carries them; the registry that loads them arrives with the
enrichment issue.
"""
