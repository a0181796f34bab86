import sys

from text4vpr.cli import main

sys.exit(main())
