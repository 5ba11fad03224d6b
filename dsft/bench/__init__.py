"""`dsft bench`: the speed of dsft against plain transformers + PEFT (B0) and TRL alone (B1), behind a correctness gate."""
