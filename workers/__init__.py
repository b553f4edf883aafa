"""Orchestra: workers."""
