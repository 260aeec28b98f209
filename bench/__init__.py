"""ramfs benchmarks: image generator, FUSE ceilings, measurements, report.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py --help``). See bench/README.md.
"""
