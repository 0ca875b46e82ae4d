"""Server-rendered screens (Jinja2 templates, htmx): one blueprint module per area."""
