"""The XDP C sources, shipped as package data: `dataplane` finds them with
importlib.resources, so an installed wheel compiles the same files as a checkout."""
