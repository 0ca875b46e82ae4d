"""Metadata bundles that ship: ``core`` and the industry templates (package ``metacrm.bundles``)."""
