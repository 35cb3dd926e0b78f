"""One step of physics on any number of ranks: neighbour list, partition, halo, model, forces."""
