"""Builds the Cython extensions of rtcore; everything else is in pyproject.toml."""

import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - Cython is a build requirement
    cythonize = None

sources = sorted(glob.glob(os.path.join("rtcore", "*.pyx")))
if not sources:
    # Without its extensions rtserver still installs, as a pure-Python wheel running the slow
    # reference engine: an operator would learn it from one log line, if at all.
    raise SystemExit("setup.py: no rtcore/*.pyx found: run it from the source tree or an sdist of it")
if cythonize is None:
    # setuptools then compiles the .c an sdist carries for each .pyx; a source tree has none.
    missing = [p[:-4] + ".c" for p in sources if not os.path.exists(p[:-4] + ".c")]
    if missing:
        raise SystemExit(
            f"setup.py: building rtcore needs Cython>=3.0 (pip install Cython), or an sdist that carries the "
            f"generated C ({', '.join(missing)} missing)"
        )

extensions = [
    Extension(
        "rtcore." + os.path.splitext(os.path.basename(path))[0],
        [path],
        extra_compile_args=["-O3"],
    )
    for path in sources
]

if cythonize is not None:
    extensions = cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    )

class BuildExt(build_ext):
    """build_ext, with what a failed compilation needs said plainly: without a C compiler (or
    Python's headers) setuptools ended on "Command '['gcc', ...]' returned non-zero exit status
    1", naming neither."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, ExecError, OSError) as exc:
            raise SystemExit(
                f"setup.py: compiling {ext.name} failed ({exc}). rtserver's core (rtcore) is C: it needs a C compiler "
                "(gcc or clang) and Python's headers (Debian: apt-get install gcc python3-dev); see README, Set up"
            ) from None


setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
