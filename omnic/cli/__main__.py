import sys

from omnic.cli.app import main

sys.exit(main())
