import sys

from feedloop.client.cli import main

sys.exit(main())
