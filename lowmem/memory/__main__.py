"""python -m lowmem.memory CONFIG.yaml [key=value ...]: the memory planner."""
import sys

from lowmem.memory.planner import main

sys.exit(main())
