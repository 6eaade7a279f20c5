"""``python -m ragline.cli``: the ``ragline`` command."""

from ragline.cli import main

main()
