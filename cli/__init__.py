"""The ``mame-deploy`` command: a thin typer layer over the library."""
