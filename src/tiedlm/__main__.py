import sys

from tiedlm.cli import main

sys.exit(main())
