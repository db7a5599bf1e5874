"""Test-suite set-up: ``support`` (the shared helpers) is importable from every test
directory (``pythonpath`` in pyproject.toml), and every test that starts processes carries
the ``multiprocess`` marker, so ``pytest -m "not multiprocess"`` runs the one-process suite
in a minute or two."""
