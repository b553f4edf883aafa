"""PEFT family: LoRA and its variants (see registry.py; config.py holds the hyperparameters).

Kept free of torch imports so that ``algorithms.peft.config`` loads without torch: import
``algorithms.peft.registry`` for ``PEFT.build(cfg, model, batches, task_type=...)`` / ``apply``.
"""
