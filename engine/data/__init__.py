"""From files to uint8 batches. Never imports MegEngine: workers start fast and any framework
can consume the numpy batches."""
from engine.data.loader import Loader, default_workers

__all__ = ["Loader", "default_workers"]
