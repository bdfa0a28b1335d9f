"""Builds the Cython extensions of rtcore; everything else is in pyproject.toml."""

import glob
import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - Cython is a build requirement
    cythonize = None

sources = sorted(glob.glob(os.path.join("rtcore", "*.pyx")))
extensions = [
    Extension(
        "rtcore." + os.path.splitext(os.path.basename(path))[0],
        [path],
        extra_compile_args=["-O3"],
    )
    for path in sources
]

if cythonize is not None and extensions:
    extensions = cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )

setup(ext_modules=extensions)
