"""Building blocks of the backbone: CG tables, radial basis and cutoff, linear maps and embeddings,
the interaction (convolution), the symmetric contraction (ACE product basis) and the readouts."""
