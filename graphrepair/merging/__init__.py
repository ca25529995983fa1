"""Merging: observation and reset points, the joint statistics pass of A and B, alignment, interpolation and REPAIR."""
