"""``python -m datasites.cli``."""

from datasites.cli.main import main

main()
