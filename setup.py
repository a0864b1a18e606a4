"""The build of colo-ring's native core (ring._native); the metadata is in setup.cfg.

The extension is three C files (core.c: the pause's loops; gate.c: the vCPUs' run loop and
barrier; stream.c: the stream device's checkpoint state), and checkpointer._codec a second one (checkpointer/native/codec.c: the page
encoder's cache phase for small batches), compiled with gcc by setuptools' own build_ext
(`pip install -e '.[test]'` builds it in place). Nothing is downloaded: the
build needs gcc and the Python headers, and says so by name when either is
missing rather than failing inside the compiler.
"""

import os
import shlex
import shutil
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError


class BuildNative(build_ext):
    """build_ext that checks for gcc and Python.h first, with an error that names what is missing."""

    def run(self):
        compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "gcc")[0]
        if shutil.which(compiler) is None:
            raise CompileError(
                f"colo-ring's native core (ring/native/core.c) needs a C compiler, gcc, and "
                f"{compiler!r} is not on PATH: install gcc (./install-deps does, or: apt-get install gcc) "
                f"and run the install again")
        include = sysconfig.get_paths()["include"]
        if not os.path.exists(os.path.join(include, "Python.h")):
            raise CompileError(
                f"colo-ring's native core needs the Python headers, and {include}/Python.h is missing: "
                f"install them (apt-get install python3-dev) and run the install again")
        super().run()


setup(
    ext_modules=[Extension(
        "ring._native",
        sources=["ring/native/core.c", "ring/native/gate.c", "ring/native/stream.c"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
    ), Extension(
        "checkpointer._codec",
        sources=["checkpointer/native/codec.c"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter",
                            "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
    )],
    cmdclass={"build_ext": BuildNative},
)
