"""`python -m moecxl.traces collect|stats` (see `moecxl.traces.cli`)."""

from moecxl.traces.cli import main

main()
