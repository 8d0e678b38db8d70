"""From files to uint8 batches. Never imports MegEngine: workers start fast and any framework
can consume the numpy batches."""
from engine.data.cpus import default_workers, usable_cores
from engine.data.loader import Loader

__all__ = ["Loader", "default_workers", "usable_cores"]
