"""IOC enrichment: plugins, their registry, the result cache, shared API keys, the TLP/PAP gate."""
