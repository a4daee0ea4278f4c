"""dstcli: Dynamic Subset Tuning, and compact bit-exact sparse patches of checkpoints."""

__version__ = "0.1.0"
