"""Reproductions of papers' claims through the service: manifests, runs, verdicts."""
