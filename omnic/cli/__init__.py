"""The ``omnic`` command line. Library modules never import this package."""
from omnic.cli.app import main

__all__ = ["main"]
