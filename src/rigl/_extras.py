"""Optional packages and the ``pip install "rigl[EXTRA]"`` extra that brings each.

torch is the only hard dependency; the experiments (``rigl train``, ``compare``,
``report``), TensorBoard logging, the compiled kernels' build and the framework
callbacks need more. A test checks this table against ``pyproject.toml``'s
``[project.optional-dependencies]``, so the two cannot drift apart.
"""

from __future__ import annotations

# import name -> (distribution name, extras that install it; the first one is suggested)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "numpy": ("numpy", ("experiments",)),
    "yaml": ("pyyaml", ("experiments",)),
    "matplotlib": ("matplotlib", ("experiments",)),
    "tqdm": ("tqdm", ("experiments",)),
    "mnist1d": ("mnist1d", ("experiments",)),
    "mlxtend": ("mlxtend", ("experiments",)),
    "safetensors": ("safetensors", ("experiments", "sparse")),
    "ninja": ("ninja", ("sparse",)),
    "tensorboard": ("tensorboard", ("tensorboard",)),
    "lightning": ("lightning", ("integrations",)),
    "transformers": ("transformers", ("integrations",)),
    "accelerate": ("accelerate", ("integrations",)),
}


def install_hint(module: str) -> str | None:
    """How to install the package of ``module`` (an import name), or None if unknown."""
    top = module.split(".")[0]
    if top == "torch":
        return "pip install torch (see pytorch.org for a CUDA build)"
    if top not in EXTRAS:
        return None
    return f'pip install "rigl[{EXTRAS[top][1][0]}]"'


def missing_package_message(exc: ModuleNotFoundError) -> str | None:
    """``needs the package 'numpy' (not installed): pip install "rigl[experiments]"``, or
    None when ``exc`` is not about an optional dependency (a bug or a broken install then
    shows its traceback)."""
    name = exc.name or ""
    hint = install_hint(name)
    if hint is None:
        return None
    top = name.split(".")[0]
    package = EXTRAS[top][0] if top in EXTRAS else top
    return f"needs the package {package!r} (not installed): {hint}"
