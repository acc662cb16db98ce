"""Experiments that answer questions about Llama's design by training small models both ways (see
docs/experiments.md): `python -m experiments NAME [--quick] [--seeds N] [--out DIR] [--text FILE]`. They
live outside the installed package and build their variants from the library's modules."""
