import sys

from cdm_fast.cli import main

sys.exit(main())
