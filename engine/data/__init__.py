"""From files to uint8 batches. Never imports MegEngine: workers start fast and any framework
can consume the numpy batches."""
from engine.data.cpus import default_workers, usable_cores
from engine.data.loader import Loader
from engine.data.options import LoaderOptions

__all__ = ["Loader", "LoaderOptions", "default_workers", "usable_cores"]
