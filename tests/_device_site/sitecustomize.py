"""On PYTHONPATH with UC_DEVICE_ONLY naming a JSON file {"modules": [...], "distributions":
[...]}, this interpreter finds only those top-level modules and distributions (and the standard
library): what the device machine has (tests/test_gpu_bench.py writes the file from
bench/device-image.txt and bench/device-wheels.txt). Everything else is hidden from the import
system's finders, so importing it fails as a missing module does there, probes such as
importlib.util.find_spec see it missing (an optional module is skipped, a needed one fails the
program), and importlib.metadata finds no distribution of it."""

import json
import os
import re
import sys

_ONLY = json.load(open(os.environ["UC_DEVICE_ONLY"]))
_MODULES = frozenset(_ONLY["modules"])
_DISTS = frozenset(_ONLY["distributions"])
_STDLIB = os.path.dirname(os.__file__) + os.sep      # the standard library's folder
_SITE = ("site-packages", "dist-packages")


def _stdlib(spec) -> bool:
    origin = getattr(spec, "origin", None) or ""
    return (spec.origin in ("built-in", "frozen") or origin.startswith(_STDLIB)
            and not any(s in origin for s in _SITE))


class _DeviceOnly:
    """A finder that shows the wrapped one's modules and distributions of the device only."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        find = getattr(self.finder, "find_spec", None)
        if find is None:
            return None
        top = name.partition(".")[0]
        if top in _MODULES or top in sys.stdlib_module_names:
            return find(name, path, target)
        spec = find(name, path, target)             # e.g. _sysconfigdata_*: stdlib, unlisted
        return spec if spec is not None and _stdlib(spec) else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.finder, "find_distributions", None)
        for d in (find(*args, **kwargs) if find is not None else ()):
            name = d.metadata["Name"] or ""
            if re.sub(r"[-_.]+", "-", name).lower() in _DISTS:
                yield d

    def invalidate_caches(self):
        if hasattr(self.finder, "invalidate_caches"):
            self.finder.invalidate_caches()


sys.meta_path[:] = [_DeviceOnly(f) for f in sys.meta_path]
