"""Benchmarks and long checks, each a script (``python benchmarks/<name>.py``); a package
only so that they can share code (``benchmarks.load``, ``benchmarks.runtimes``) and be
type-checked. They import the product and ``testsupport``, never ``tests``."""
