"""`python -m moecxl`: the main job (see moecxl.pipeline)."""

import sys

from moecxl.pipeline import main

sys.exit(main())
