"""Thin command-line layers over library functions; each module has `main(argv) -> int`."""
