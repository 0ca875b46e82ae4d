"""Shipped defaults (package ``metacrm.defaults``): settings, later the Casbin model."""
