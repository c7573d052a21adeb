"""``python -m pipeline.cli``: the ``atman`` command (what a submitted job runs on the cluster)."""

from pipeline.cli import main

main()
