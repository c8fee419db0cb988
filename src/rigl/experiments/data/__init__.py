"""Datasets by name (``datasets``) and the file formats and downloads under them (``files``)."""
