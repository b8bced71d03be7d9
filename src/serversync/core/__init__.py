"""Pure domain logic: the model, the seed's rules, typed errors. Standard library only."""
