import sys

from galvatron.launch.cli import main

sys.exit(main())
