"""`python -m posttrain ...` (what `torchrun -m posttrain` and `accelerate launch -m posttrain` run)."""

from posttrain.cli import main

main()
