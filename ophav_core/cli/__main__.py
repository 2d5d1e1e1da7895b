"""``python -m ophav_core.cli``: the ``ophav`` command."""
from ophav_core.cli import main

main()
