import sys

from api.worker.cli import main

sys.exit(main(sys.argv[1:]))
