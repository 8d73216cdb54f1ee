"""The one compiled part: the sqlite3 query hook (perfagent/_speedups.c).

``optional=True``: where no C compiler is found, pip installs the package without
it and the same hook runs in Python (slower per query, same results).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("perfagent._speedups", ["perfagent/_speedups.c"], optional=True)])
