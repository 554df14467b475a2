import sys

from api.worker import main

sys.exit(main(sys.argv[1:]))
