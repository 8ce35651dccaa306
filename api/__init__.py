"""api: the HTTP service, the `prism` CLI and settings wiring. Nothing imports api."""
