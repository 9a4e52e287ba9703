"""Pretrain or fine-tune: python train.py CONFIG.yaml [MORE.yaml ...] [dotted.key=value ...]"""
import sys

from lowmem.cli import main

if __name__ == "__main__":
    sys.exit(main())
