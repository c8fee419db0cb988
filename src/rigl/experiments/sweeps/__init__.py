"""Many runs (``rigl compare``): the sweep grid, the comparison driver, its table and plots."""
