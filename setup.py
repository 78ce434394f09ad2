"""Cython extensions live in cython/ and are built into the packages that use them;
so are the eBPF objects that libbpf loads (compiled with clang: bcc cannot build
kfunc calls)."""
import os
import shutil
import sysconfig

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSIONS = [
    Extension("control._maglev", ["cython/maglev.pyx"]),
    Extension("dataplane._flowhash", ["cython/flowhash.pyx"]),
    Extension("dataplane._fold", ["cython/fold.pyx"], include_dirs=[numpy.get_include()]),
]
# (source, package, object file in the package)
BPF_OBJECTS = [("ebpf/elemcount.bpf.c", "dataplane", "elemcount.bpf.o")]


class BuildExt(build_ext):
    """The Cython extensions, then the eBPF objects beside them (in the source tree
    for an in-place or editable build, as extensions are)."""

    def run(self) -> None:
        super().run()
        clang = shutil.which("clang")
        if clang is None:
            raise SystemExit("setup.py: clang not found: the eBPF objects need clang and libbpf-dev "
                             "(`make setup` installs them)")
        build_py = self.get_finalized_command("build_py")
        # <linux/types.h> includes <asm/types.h>, which Debian keeps under the multiarch dir
        multiarch = sysconfig.get_config_var("MULTIARCH")
        includes = ["-idirafter", f"/usr/include/{multiarch}"] if multiarch else []
        for source, package, name in BPF_OBJECTS:
            out_dir = build_py.get_package_dir(package) if self.inplace else os.path.join(self.build_lib, package)
            os.makedirs(out_dir, exist_ok=True)
            self.spawn([clang, "-target", "bpf", "-O2", "-g", "-Wall", "-Werror", *includes, "-c", source,
                        "-o", os.path.join(out_dir, name)])


setup(ext_modules=cythonize(EXTENSIONS, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True}),
      cmdclass={"build_ext": BuildExt})
