"""The request histograms' series: one list of totals each, shown without prometheus-client.

Measured under ``perfagent run`` with 5,000 Flask routes each requested once,
the worker grew 41 KB a route (bare: 0.05 KB): each route made two
prometheus-client histogram children, and each child keeps one value object per
bucket (16 for a request duration) with, in multiprocess mode, its JSON key
string (~260 bytes), its parameters and its file position, kept twice. A
series needs its label values and a total per bucket; that is what is kept
here (``HistogramSeries.totals``). ``stats.py`` merges the threads' buffers
into it; ``collect()`` shows it to a registry (scrapes in-process, the OTLP
stats export), and under ``perfagent run`` each changed total is written to
this worker's file in the multiprocess directory (``SeriesFile``), in
prometheus-client's own format, so the runner's ``MultiProcessCollector``
reads it with the other workers' files. A total's place in the file is kept
(one int), not its key.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.mmap_dict import mmap_key
from prometheus_client.utils import floatToGoString

_INITIAL_SIZE = 1 << 16
_used = struct.Struct("i")
_two_doubles = struct.Struct("dd")


class SeriesFile:
    """This process's file of histogram values in the multiprocess directory, in the
    format of prometheus-client's ``MmapedDict`` (its ``mmap_dict.py``): a used-bytes
    int, padding, then entries of (key length, key padded to 8 bytes, value,
    timestamp). Written by one thread at a time (``stats.py``'s flush lock)."""

    def __init__(self, directory: str) -> None:
        # Named as prometheus-client's own files are (the type, then the pid), with a
        # suffix of ours: prometheus-client writes histogram_<pid>.db itself.
        self.path = os.path.join(directory, f"histogram_{os.getpid()}_perfagent.db")
        self._file = open(self.path, "a+b")  # noqa: SIM115 - kept open, closed in close()
        size = os.fstat(self._file.fileno()).st_size
        if size < _INITIAL_SIZE:
            self._file.truncate(_INITIAL_SIZE)
            size = _INITIAL_SIZE
        self._size = size
        self._map = mmap.mmap(self._file.fileno(), size)
        self._end = 8
        self._map[0:4] = _used.pack(self._end)

    def add(self, key: str) -> int:
        """A new entry for ``key`` (at 0.0): where its value is written."""
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entry = struct.pack(f"i{len(padded)}sdd", len(encoded), padded, 0.0, 0.0)
        while self._end + len(entry) > self._size:
            self._size *= 2
            self._file.truncate(self._size)
            self._map = mmap.mmap(self._file.fileno(), self._size)
        self._map[self._end : self._end + len(entry)] = entry
        self._end += len(entry)
        self._map[0:4] = _used.pack(self._end)  # after the entry: a reader sees it whole
        return self._end - 16

    def write(self, position: int, value: float) -> None:
        # One slice assignment, as prometheus-client does: never a torn read of 0.
        self._map[position : position + 16] = _two_doubles.pack(value, 0.0)

    def close(self) -> None:
        self._map.close()
        self._file.close()


class ProcessFile:
    """The ``SeriesFile`` of this process, opened on first write: a process that serves
    no request makes none, and a forked worker opens its own."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._file: SeriesFile | None = None
        self._pid = 0

    def get(self) -> SeriesFile:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = SeriesFile(self.directory), os.getpid()
        return self._file

    @property
    def pid(self) -> int:
        return self._pid


class HistogramSeries:
    """One histogram's series by label values: [count per bucket ..., +Inf count, sum]."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], bounds: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._upper = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
        #: label values (str) -> totals; a new list per series, never replaced.
        self.totals: dict[tuple[str, ...], list[Any]] = {}
        #: label values -> each total's position in ``file`` (buckets, then the sum).
        self._positions: dict[tuple[str, ...], array] = {}
        self._positions_pid = 0
        #: Set under ``perfagent run`` (prometheus-client's multiprocess mode).
        self.file: ProcessFile | None = None

    def series(self, labels: tuple[str, ...]) -> list[Any]:
        """The totals of one series, made (at zero) on first use."""
        totals = self.totals.get(labels)
        if totals is None:
            totals = self.totals[labels] = [0] * len(self._upper) + [0.0]
        return totals

    def written(self, labels: tuple[str, ...], changed: Sequence[int]) -> None:
        """Writes the totals at ``changed`` indexes (the sum is the last) to the file."""
        if self.file is None:
            return
        file = self.file.get()
        if self._positions_pid != self.file.pid:  # a new file: nothing of ours in it
            self._positions, self._positions_pid = {}, self.file.pid
        positions = self._positions.get(labels)
        if positions is None:
            positions = self._positions[labels] = self._place(file, labels)
        totals = self.totals[labels]
        for index in changed:
            file.write(positions[index], float(totals[index]))

    def _place(self, file: SeriesFile, labels: tuple[str, ...]) -> array:
        """Entries for a new series in the file, keyed as prometheus-client keys them."""
        names, bucket_names = list(self.labelnames), [*self.labelnames, "le"]
        keys = [
            mmap_key(
                self.name, self.name + "_bucket", bucket_names, [*labels, le], self.documentation
            )
            for le in self._upper
        ]
        keys.append(
            mmap_key(self.name, self.name + "_sum", names, list(labels), self.documentation)
        )
        return array("q", [file.add(key) for key in keys])

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, totals in list(self.totals.items()):
            running, buckets = 0, []
            for upper, count in zip(self._upper, totals, strict=False):
                running += count
                buckets.append((upper, running))
            family.add_metric(list(labels), buckets, totals[-1])
        yield family

    def reset(self) -> None:
        """A forked worker starts from zero (its parent's series are the parent's)."""
        self.totals = {}
        self._positions = {}


class SeriesCollector:
    """Shows the series to a prometheus-client registry."""

    def __init__(self, histograms: Sequence[HistogramSeries]) -> None:
        self._histograms = list(histograms)

    def collect(self) -> Iterator[Metric]:
        for histogram in self._histograms:
            yield from histogram.collect()
