"""Below train, eval, bench and demo: the result-file header, plots and the locality statistics of selection traces."""
