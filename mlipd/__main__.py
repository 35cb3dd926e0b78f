import sys

from mlipd.launch import main

sys.exit(main())
