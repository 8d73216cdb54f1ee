"""The compiled parts: perfagent/_speedups.c (the per-query work: the sqlite3
hook, the call-site walk, the N+1 grouping and summary, the query histogram) and
perfagent/_perrequest.c (per-request work: the prepared log line).

``optional=True``: where no C compiler is found, pip installs the package without
them and the same code runs in Python (slower, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "perfagent._speedups",
            ["perfagent/_speedups.c"],
            depends=["perfagent/_histogram.h", "perfagent/_query.h", "perfagent/_record_slots.h"],
            optional=True,
        ),
        Extension(
            "perfagent._perrequest",
            ["perfagent/_perrequest.c"],
            depends=["perfagent/_histogram.h", "perfagent/_query.h", "perfagent/_record_slots.h"],
            optional=True,
        ),
    ]
)
