import sys

from truscl.cli import main

sys.exit(main())
