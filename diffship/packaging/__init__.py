"""Packaging exports for native apps (``diffship package``): one module per target."""
