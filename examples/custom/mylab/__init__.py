"""A user's own package, shipped with the run (``orchestra submit spec.yaml --code examples/custom``)."""
