import sys

from vitalproof.cli import main

sys.exit(main())
