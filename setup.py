"""The one compiled part, perfagent/_speedups.c: the per-query work (the sqlite3
hook, the call-site walk, the N+1 grouping and summary, the query histogram).

``optional=True``: where no C compiler is found, pip installs the package without
it and the same code runs in Python (slower per query, same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("perfagent._speedups", ["perfagent/_speedups.c"], optional=True)])
