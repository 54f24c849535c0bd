"""Placement before loading: sizes from a config alone, device maps over GPU/CPU/disk, disk offload, the plan."""
