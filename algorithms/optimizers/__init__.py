"""Optimizers selectable by ``optimizer.name`` in a spec: torch's adamw and sgd, GaLore, DCT,
AdaZo-SAM, LORENZA(+), SAM, LAMB and diffGrad; ``PartitionedOptimizer`` runs any of them with
optimizer state partitioned by whole parameters across ranks (ZeRO-1/2 style).

Import the registry for the optimizers (``OPTIMIZERS.build(cfg, params)``); ``config`` has no
torch import so that the spec validates without torch.
"""
