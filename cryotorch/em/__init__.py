"""One EM iteration: the E-step as matrix products over chunks, the M-step as reconstructions."""
