"""The ``konsul`` command: the entry point above ``konsul.edge`` and ``konsul.hub`` (cli/main.py)."""
