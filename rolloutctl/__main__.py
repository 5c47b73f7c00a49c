import sys

from rolloutctl.cli import main

sys.exit(main())
