"""Byzantine-robust gradient aggregation rules and attacks (pure PyTorch); see ``registry``."""
