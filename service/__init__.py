"""Orchestra: service."""
