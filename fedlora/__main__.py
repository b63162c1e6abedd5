"""``python -m fedlora``: the ``fedlora`` command."""

from fedlora.cli.main import main

main()
