import sys

from lowmem.study import main

sys.exit(main())
