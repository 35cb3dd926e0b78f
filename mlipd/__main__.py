import sys

from mlipd.cli import main

sys.exit(main())
