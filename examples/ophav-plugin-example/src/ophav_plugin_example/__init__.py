"""An example third-party ophav plugin: the ``unsharp`` restorer (an unsharp mask inside the head's alpha)."""
__version__ = "0.1.0"
