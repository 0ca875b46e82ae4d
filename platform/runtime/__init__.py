"""What metadata becomes: tenant storage, records, the REST API, identity and access."""
