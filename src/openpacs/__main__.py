import sys

from openpacs.cli import main

sys.exit(main())
