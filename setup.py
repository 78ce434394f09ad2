"""Cython extensions live in cython/ and are built into the packages that use them."""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = [
    Extension("control._maglev", ["cython/maglev.pyx"]),
    Extension("dataplane._flowhash", ["cython/flowhash.pyx"]),
    Extension("dataplane._fold", ["cython/fold.pyx"], include_dirs=[numpy.get_include()]),
]

setup(ext_modules=cythonize(EXTENSIONS, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True}))
