import sys

from vitalproof_verify.cli import main

sys.exit(main())
