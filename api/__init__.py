"""Orchestra: api."""
