"""Package layout: the repo's `kernels/` folder installs as `megatron_refine.kernels`; `recipes/` (NeMo-Run) as
`recipes`, so `python -m recipes` works from any directory.

It is never installed as a top-level `kernels`: that name belongs to a Hugging Face distribution which
transformers probes for. Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["megatron_refine", "megatron_refine.*", "recipes"])
    + ["megatron_refine.kernels"]
    + [f"megatron_refine.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"megatron_refine.kernels": "kernels"},
)
