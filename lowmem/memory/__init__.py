"""Memory: state, weight and activation accounting, and the planner (`python -m lowmem.memory`). See README.md here."""
