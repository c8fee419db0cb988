"""Experiments: the ``rigl`` CLI's commands, grouped by concern.

- ``config`` / ``flags``: the experiment config (one dataclass; every field is a ``--flag``).
- ``runio``: atomic writes, CSV/JSON files, provenance (shared by every group).
- ``data``: datasets by name and their file formats.  ``models``: the model zoo by name.
- ``training``: one run (``rigl train``).  ``sweeps``: many runs (``rigl compare``).
- ``reports``: figures and a page for run folders (``rigl report``).  ``flops_cli``: ``rigl flops``.

Nothing in the library imports this package; it imports the library.
"""
