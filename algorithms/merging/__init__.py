"""Model merging: average, task arithmetic, TIES, PLeaS and aTLAS.

Kept free of torch imports so that ``algorithms.merging.config`` loads without torch; the
mergers live in ``algorithms.merging.registry`` (``MERGERS``: ``MERGERS.build(cfg)``, ``build(name, **fields)``).
"""
