"""Repository functions: take a session, return domain objects. One module per resource."""
