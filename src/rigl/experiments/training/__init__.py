"""One training run (``rigl train``): the loop, its parts, its folder, checkpoints and recorders."""
