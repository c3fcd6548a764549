"""The fleet's model releases: the TUF repository that signs them (``repository``) and its key files
(``_tuf_keys``). Boxes verify what it publishes with ``edge.ota`` against the manifest of ``edge.wire.manifest``."""
