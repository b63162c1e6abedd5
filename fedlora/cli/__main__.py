"""``python -m fedlora.cli``: the ``fedlora`` command."""

from fedlora.cli.main import main

main()
