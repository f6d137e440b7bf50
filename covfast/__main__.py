import sys

from covfast.cli import main

sys.exit(main())
