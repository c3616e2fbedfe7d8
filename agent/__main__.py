import sys

from .main import main

sys.exit(main(["gpu-router"] + sys.argv[1:]))
