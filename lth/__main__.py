"""`python -m lth` is `python -m lth.train`."""
import sys

from lth.train import main

sys.exit(main())
