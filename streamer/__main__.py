"""`python -m streamer ...`: the same command line as the `streamer` console script."""
import sys

from .cli import main

sys.exit(main())
